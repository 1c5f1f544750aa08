"""python -m bench scale: what updates and reads of a store cost as it grows, version 1 (every update rewrites the
whole file, as the store did before version 2) against version 2 (new partitions under a small root), on
synthetic stores in the real schema; and the up-to-date check over a folder of a million files."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from bench.harness import Row, pipeline_cmd, run_json_command
from bench.synthetic import SET_NAME, _columns, _new_set

DIM = 1280
CHANGED = 1_000  # rows added, then removed, per update
READ_BLOCK = 65536


def write_store(path: Path, n: int) -> None:
    """A version-1 store of n rows (1280-d float16, a tenth in valid), written block by block: the features repeat
    one random block (their values do not matter to what is timed here, their bytes do)."""
    block = np.random.default_rng(0).standard_normal((8192, DIM), dtype=np.float32).astype(np.float16)
    counts = {"train": n - n // 10, "valid": n // 10}
    with h5py.File(path, "w") as f:
        group = _new_set(f, DIM, np.float16, ["a", "b"], 0, "efficientnet_lite0")
        for split, count in counts.items():
            g = group.create_group(split)
            chunks = (min(1024, count), DIM)
            features = g.create_dataset("features", (count, DIM), np.float16, chunks=chunks, fletcher32=True)
            for start in range(0, count, len(block)):
                k = min(len(block), count - start)
                features[start : start + k] = block[:k]
            _columns(g, split, np.arange(count) % 2, np.zeros(count, np.uint8), 0)


def new_rows(offset: int, changed: int = CHANGED):
    """Features and file records of `changed` new files, as featurize gathers them before a commit."""
    from store import FileRecord

    features = np.random.default_rng(offset).standard_normal((changed, DIM)).astype(np.float16)
    records = [
        FileRecord(f"train/new-{offset}-{i}.jpg", i % 2, 1, 1, 1, f"{offset:032x}{i:032x}") for i in range(changed)
    ]
    return features, records


def dropped_rows(n: int, changed: int = CHANGED) -> np.ndarray:
    """`changed` rows spread evenly over a split of n: the worst case for a mapping (one more segment each)."""
    return np.linspace(0, n - 1, changed).astype(np.int64)


# Version 2: the store's own door, as featurize drives it ---------------------------------------------------------
def update_v2(store: Path, add: bool, changed: int = CHANGED) -> float:
    """Add `changed` new rows (one new partition) or remove as many (mapped out) and switch the root, then the
    compaction a featurize runs; seconds."""
    from store import Store

    started = time.perf_counter()
    door = Store(store)
    with door.transaction(SET_NAME, ["a", "b"]) as tx:
        if add:
            tx.add("train", *new_rows(len(door.paths.partitions()), changed))
        else:
            tx.drop("train", dropped_rows(tx.count("train"), changed))
        tx.commit()
    with door.lock():
        door.compact()
    return time.perf_counter() - started


# Version 1: the whole file rewritten, as the store did before version 2 ------------------------------------------
def update_v1(store: Path, add: bool) -> float:
    """What an update of a version-1 store did: verify the whole set, copy every kept row and the new ones into a
    new file (Fletcher-32 on), fsync, rename over the old one; seconds."""
    from store.schema import ROW_COLUMNS
    from store.verify import verify_split

    started = time.perf_counter()
    tmp = store.with_name(store.name + ".tmp")
    with h5py.File(store, "r") as old, h5py.File(tmp, "w") as f:
        for key, value in old.attrs.items():
            f.attrs[key] = value
        src = old["sets"][SET_NAME]
        dst = f.create_group("sets").create_group(SET_NAME)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for split in src:
            verify_split(src[split])
            g, s = dst.create_group(split), src[split]
            n = len(s["labels"])
            keep = np.ones(n, bool)
            if split == "train" and not add:
                keep[dropped_rows(n)] = False
            extra = new_rows(0) if split == "train" and add else None
            total = int(keep.sum()) + (CHANGED if extra else 0)
            chunks = (min(1024, total), DIM)
            out = g.create_dataset("features", (total, DIM), np.float16, chunks=chunks, fletcher32=True)
            row = 0
            for start in range(0, n, READ_BLOCK):
                block = s["features"][start : start + READ_BLOCK][keep[start : start + READ_BLOCK]]
                out[row : row + len(block)] = block
                row += len(block)
            if extra:
                features, records = extra
                out[row:] = features
                added = {k: [] for k in ROW_COLUMNS}
                for record in records:
                    record.add_rows(added, 1)
            for name in [c for c in s if c != "features" and isinstance(s[c], h5py.Dataset)]:
                column = s[name][()][keep]
                if extra and name in ROW_COLUMNS:
                    column = np.concatenate([column, np.asarray(added[name], dtype=column.dtype)])
                g.create_dataset(name, data=column, dtype=s[name].dtype)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, store)
    return time.perf_counter() - started


# Reads: the same for both versions ---------------------------------------------------------------------------------
def up_to_date_check(store: Path) -> float:
    """The store's share of an up-to-date featurize: open the root, read the snapshot and every row's path and
    fingerprint columns (as featurize compares them with the files')."""
    from store import Store

    started = time.perf_counter()
    with Store(store).read() as snapshot:
        fs = snapshot.feature_set(SET_NAME)
        for split in ("train", "valid"):
            fs.fingerprints(split)
    return time.perf_counter() - started


def plain_read(store: Path) -> float:
    """Rows per second of a full plain-h5py read of train/features, block by block into one buffer."""
    with h5py.File(store, "r") as f:
        ds = f[f"sets/{SET_NAME}/train/features"]
        n = ds.shape[0]
        buffer = np.empty((READ_BLOCK, DIM), np.float16)
        started = time.perf_counter()
        for start in range(0, n, READ_BLOCK):
            k = min(READ_BLOCK, n - start)
            ds.read_direct(buffer, np.s_[start : start + k], np.s_[:k])
    return n / (time.perf_counter() - started)


def streamed_read(store: Path) -> float:
    """Rows per second of train-head's streamed pass over train (verified reads into reused buffers)."""
    from store import Store

    with Store(store).read() as opened:
        fs = opened.feature_set(SET_NAME)
        rows = fs.rows("train", np.arange(fs.features("train").shape[0]), in_memory=False)
        started = time.perf_counter()
        for _ in rows.whole_pass():
            pass
        return len(rows.rows) / (time.perf_counter() - started)


def disk_bytes(store: Path) -> int:
    """The store's bytes on disk: its root and every partition (a hard-linked file counted once)."""
    from store import Store

    paths = Store(store).paths
    files = [paths.store, *(paths.parts.iterdir() if paths.parts.exists() else [])]
    seen = {(os.stat(f).st_ino): os.stat(f).st_blocks * 512 for f in files}
    return sum(seen.values())


def live_bytes(store: Path) -> int:
    """What the live rows need: their features and per-row columns (as a fresh version-1 file holds them)."""
    from store import Store

    with Store(store).read() as snapshot:
        rows = snapshot.info().sets[0].live_rows
    return rows * (DIM * 2 + 8 * 3 + 4 + 1 + 64 + 32)


def store_rows(n: int, tmp: Path) -> list[Row]:
    """Every figure for one size: both versions, side by side."""
    v1, v2 = tmp / "v1.h5", tmp / "v2.h5"
    write_store(v1, n)
    os.sync()  # the store just written is on disk: an update timed next pays for its own writes, not for those
    os.link(v1, v2)  # the same version-1 file: version 2 takes it over by hard link on its first update
    label = f"{n:.0e}".replace("e+0", "e")
    rows = []
    # Three of each (a tenth of a second at any size: one run is noise); version 1's take minutes at 1e7: one each.
    v2_updates = [statistics.median(update_v2(v2, add=add) for _ in range(3)) for add in (True, False)]
    v2_reads = [plain_read(v2) for _ in range(2)], [streamed_read(v2) for _ in range(2)]
    v2_check = statistics.median(up_to_date_check(v2) for _ in range(3))
    v2_disk, v2_live = disk_bytes(v2), live_bytes(v2)
    shutil.rmtree(tmp / "v2.h5.parts")
    v2.unlink()  # before version 1 rewrites: the disk holds one copy of the rows at a time
    v1_check = statistics.median(up_to_date_check(v1) for _ in range(3))
    v1_reads = [plain_read(v1) for _ in range(2)], [streamed_read(v1) for _ in range(2)]
    v1_updates = [update_v1(v1, add=True), update_v1(v1, add=False)]
    for i, what in enumerate(("add", "remove")):
        rows.append(
            Row(
                f"{label} rows: {what} {CHANGED:,} rows, s",
                v2_updates[i],
                v1_updates[i],
                "s",
                higher_is_better=False,
                note="version 2: median of 3",
            )
        )
    rows.append(Row(f"{label} rows: up-to-date check of the store, s", v2_check, v1_check, "s", higher_is_better=False))
    for i, what in enumerate(("full plain-h5py read of train/features", "train-head streamed read")):
        rows.append(Row(f"{label} rows: {what}, rows/s", max(v2_reads[i]), max(v1_reads[i]), "rows/s"))
    rows.append(
        Row(
            f"{label} rows: disk / live rows' bytes after the updates",
            v2_disk / v2_live,
            None,
            "x",
            higher_is_better=False,
            note=f"{v2_disk / 1e9:.2f} GB on disk",
        )
    )
    v1.unlink()
    return rows


def compaction_rows(n: int, tmp: Path) -> list[Row]:
    """A tenth of the rows removed, then compaction as a featurize runs it: disk against the live rows' bytes."""
    from store import Store

    store = tmp / "c.h5"
    write_store(store, n)
    update_v2(store, add=False, changed=n // 10)  # compaction included
    door = Store(store)
    with door.lock():
        door.compact()  # collects what the first switch retired
    ratio = disk_bytes(store) / live_bytes(store)
    shutil.rmtree(tmp / "c.h5.parts")
    store.unlink()
    label = f"{n:.0e}".replace("e+0", "e")
    return [Row(f"{label} rows, a tenth removed: disk / live rows' bytes after compaction", ratio, None, "x", False)]


def folder_rows(files: int, tmp: Path) -> list[Row]:
    """The up-to-date featurize over a folder of empty files (each recorded as skipped) against a bare os.scandir
    + stat walk of the same folder."""
    data = tmp / "files"
    per_class = files // 10
    for c in range(10):
        folder = data / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:07d}.jpg").touch()
    store = tmp / "files.h5"
    run_json_command(pipeline_cmd("featurize", data, "--store", store))

    def bare_walk(folder: str) -> int:
        count = 0
        for entry in os.scandir(folder):
            if entry.is_dir():
                count += bare_walk(entry.path)
            else:
                entry.stat()
                count += 1
        return count

    ours, process, walks = [], [], []
    for _ in range(3):
        summary, wall = run_json_command(pipeline_cmd("featurize", data, "--store", store))
        ours.append(summary["seconds"])
        process.append(wall)
        started = time.perf_counter()
        bare_walk(str(data))
        walks.append(time.perf_counter() - started)
    shutil.rmtree(data)
    store.unlink()
    walk = statistics.median(walks)
    label = f"{files:.0e}".replace("e+0", "e")
    return [
        Row(f"up-to-date featurize over {label} files, s", statistics.median(ours), walk, "s", False, "vs a walk"),
        Row("the same, whole process, s", statistics.median(process), walk, "s", False, "with Python and imports"),
    ]


def bench_store_scale(quick: bool, tmp: Path) -> list[Row]:
    """Every row of `python -m bench scale`."""
    chosen = os.environ.get("BENCH_SCALE_SIZES")  # e.g. "100000,1000000": those store sizes alone; "files": the folder
    picked = chosen.split(",") if chosen else []
    sizes = (
        [int(n) for n in picked if n != "files"]
        if chosen
        else (10_000, 100_000)
        if quick
        else (100_000, 1_000_000, 10_000_000)
    )
    rows = []
    for n in sizes:
        rows += store_rows(n, tmp)
        print(f"scale: {n:,} rows done", file=sys.stderr, flush=True)
    for n in [n for n in sizes if n <= 1_000_000]:
        rows += compaction_rows(n, tmp)
    if not chosen or "files" in picked:
        rows += folder_rows(10_000 if quick else 1_000_000, tmp)
    return rows
