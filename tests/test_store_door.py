"""The store driven in-process through its one door, on synthetic rows (no image is decoded): every snapshot
promise, for our readers and for plain h5py, whatever happens in the partitions folder."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, one_line_error, run_cli, run_json

from bench.synthetic import write_feature_store
from store import FileRecord, Store
from store.snapshot import root_bytes

SET = "efficientnet_lite0-door"
DIM = 16
ATTRS = {
    "backbone": "efficientnet_lite0",
    "arch": "tf_efficientnet_lite0",
    "weights_sha256": "0" * 64,
    "preprocessing": {"size": 224, "resize": 256, "mean": [127.5] * 3, "std": [127.5] * 3},
    "feature_dim": DIM,
    "views": 0,
    "seed": 0,
    "augmentation": None,
    "precision": "fp32",
    "dtype": "float16",
    "data_dir": "/nowhere",
    "layout": "split-folders",
}


def rows(split: str, first: int, n: int, seed: int = 0) -> tuple[np.ndarray, list[FileRecord]]:
    """n rows of distinct files: features drawn from the seed, labels alternating, a distinct content hash each."""
    features = np.random.default_rng(seed * 100_003 + first).standard_normal((n, DIM)).astype(np.float16)
    records = [
        FileRecord(f"{split}/{i}.jpg", i % 2, 10 + i, 1, 1, f"{seed:032x}{i:032x}") for i in range(first, first + n)
    ]
    return features, records


def add(store: Store, split: str, first: int, n: int, seed: int = 0) -> None:
    with store.transaction(SET, ["a", "b"], ATTRS) as tx:
        tx.add(split, *rows(split, first, n, seed))
        tx.commit()


def drop(store: Store, split: str, picked) -> None:
    with store.transaction(SET, ["a", "b"]) as tx:
        tx.drop(split, np.asarray(picked))
        tx.commit()


def made(path, seed: int = 0) -> Store:
    """A store of three partitions: train rows 0-39 and 40-79, valid rows 0-19."""
    store = Store(path)
    add(store, "train", 0, 40, seed)
    add(store, "train", 40, 40, seed)
    add(store, "valid", 0, 20, seed)
    return store


def content(store: Store) -> dict:
    with store.read() as snapshot:
        fs = snapshot.feature_set(SET)
        return {
            split: (fs.features(split)[()], list(fs.column(split, "paths")), fs.column(split, "labels"))
            for split in fs.splits
        }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[s][0], b[s][0]) and a[s][1] == b[s][1] and np.array_equal(a[s][2], b[s][2]) for s in a
    )


PLAIN_READER = """
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")  # plain h5py, with HDF5's own file locking
print("open", flush=True)
sys.stdin.readline()
g = f["sets/" + sys.argv[2]]
np.savez(sys.argv[3], x=g["train/features"][()], y=g["train/labels"][()], p=g["valid/paths"][()].astype("U"))
"""


def test_a_reader_keeps_its_snapshot_through_any_number_of_switches_removals_and_compactions(tmp_path):
    store = made(tmp_path / "s.h5")
    before = content(store)
    plain = subprocess.Popen(
        [sys.executable, "-c", PLAIN_READER, str(store.paths.store), SET, str(tmp_path / "plain.npz")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert plain.stdout.readline().strip() == "open"
    ours = store.read()
    add(store, "train", 80, 1)  # a switch that drops no partition
    drop(store, "train", range(0, 40, 4))  # removals ...
    store.compact(dead_share=0.01)  # ... that compaction reclaims: a partition rewritten and dropped
    drop(store, "valid", [0, 1])
    store.compact(dead_share=0.01)
    add(store, "train", 81, 3)
    store.compact(dead_share=0.01)
    plain.communicate("go\n", timeout=120)
    read = np.load(tmp_path / "plain.npz")
    assert np.array_equal(read["x"], before["train"][0]) and np.array_equal(read["y"], before["train"][2])
    assert list(read["p"]) == before["valid"][1]
    fs = ours.feature_set(SET)
    assert same({s: (fs.features(s)[()], list(fs.column(s, "paths")), fs.column(s, "labels")) for s in before}, before)
    ours.close()
    store.compact(dead_share=0.01)  # no reader holds them now: everything not mapped goes
    assert not store.paths.retired_roots()
    with store.read() as snapshot:
        mapped = snapshot.snapshot.partitions()
    assert set(store.paths.partitions()) == mapped


def test_a_missing_row_never_reads_as_a_real_one_in_plain_h5py_and_readers_refuse(tmp_path):
    """The fill values of the root's virtual datasets: NaN features, labels and views out of range."""
    store = made(tmp_path / "s.h5")
    (store.paths.parts / store.paths.partitions()[0]).unlink()
    with h5py.File(store.paths.store, "r") as f:
        train = f[f"sets/{SET}/train"]
        assert np.isnan(train["features"][:40].astype(np.float32)).all()
        assert (train["labels"][:40] == np.iinfo(np.int32).min).all() and (train["view"][:40] == 255).all()
        assert (train["size"][:40] == -1).all() and np.isfinite(train["features"][40:]).all()
    with pytest.raises(Exception, match="is missing"):
        store.read()


def test_things_in_the_partitions_folder_that_are_not_regular_files_are_never_opened(tmp_path):
    store = made(tmp_path / "s.h5")
    store.compact()  # no retired root left: the names below are free
    os.mkfifo(store.paths.parts / f"{SET}.1000000000000-1-0.h5")  # named like an unmapped partition
    os.mkfifo(store.paths.parts / "retired-00000000.h5")
    (store.paths.parts / "retired-00000001.h5").mkdir()
    script = (
        "from store import Store\n"
        f"s = Store({str(store.paths.store)!r})\n"
        f"with s.lock(), s.sync({SET!r}, ['a', 'b']) as sync: print(len(sync.sources))\n"
        "print(s.compact(0.01).deleted)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    compacted = run_json("store", "compact", store.paths.store, "--dead-share", "0")
    assert compacted["rewritten"] == [] and run_cli("store", "info", store.paths.store, "--verify").returncode == 0


def test_a_root_whose_virtual_datasets_disagree_with_its_segments_is_damaged_and_repaired(tmp_path):
    store = made(tmp_path / "s.h5")
    before = content(store)
    with h5py.File(store.paths.store, "r+") as f:  # the two train segments listed in the other order, every table
        for table in ("segments", "location_segments", "label_segments"):
            segments = f[f"sets/{SET}/train/{table}"]
            segments[...] = segments[()][::-1]
    proc = run_cli("store", "info", store.paths.store, "--verify", check=False)
    one_line_error(proc, "disagrees with itself", "pipeline store repair")
    store.repair()  # written again from its tables: they say the other order
    after = content(store)
    assert after["train"][1] == before["train"][1][40:] + before["train"][1][:40]
    assert np.array_equal(after["train"][0], np.concatenate([before["train"][0][40:], before["train"][0][:40]]))


def test_a_partition_of_another_store_put_in_the_place_of_one_is_refused(tmp_path):
    store, other = made(tmp_path / "s.h5"), made(tmp_path / "t.h5", seed=1)
    victim = store.paths.partitions()[0]
    os.replace(other.paths.parts / other.paths.partitions()[0], store.paths.parts / victim)
    with pytest.raises(Exception, match="is not the partition this root mapped"):
        store.read()
    one_line_error(run_cli("store", "info", store.paths.store, "--verify", check=False), victim, "another store's")


def test_a_version_1_store_taken_over_leaves_nothing_behind(tmp_path):
    """Every row rewritten at the takeover: the version-1 file (a legacy partition) is not mapped and goes, and so
    does the orphan of a takeover killed after its hard link."""
    x = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float16)
    path = write_feature_store(tmp_path / "s.h5", (x, np.arange(30) % 2, np.zeros(30)), backbone="efficientnet_lite0")
    store = Store(path)
    name = next(iter(h5py.File(path, "r")["sets"]))
    store.paths.parts.mkdir()
    os.link(path, store.paths.parts / "legacy-1000000000000.h5")  # a takeover killed after its link
    with store.transaction(name, ["a", "b"]) as tx:
        tx.drop("train", np.arange(30))
        tx.add("train", *rows("train", 0, 30))
        tx.commit()
    store.compact()
    assert not [p for p in store.paths.partitions() if p.startswith("legacy-")]
    assert os.stat(path).st_nlink == 1 and not store.paths.retired_roots()


def test_disk_stays_near_the_live_rows_through_updates_and_compactions(tmp_path):
    store = Store(tmp_path / "s.h5")
    add(store, "train", 0, 4000)
    for k in range(12):
        add(store, "train", 4000 + 100 * k, 100)
        drop(store, "train", np.arange(k * 150, k * 150 + 150))
        store.compact()
    with store.read() as snapshot:
        live = snapshot.info().sets[0].live_rows
    one_store = Store(tmp_path / "fresh.h5")
    add(one_store, "train", 0, live)
    assert store.size_bytes() <= 1.1 * one_store.size_bytes() + (1 << 16)


def test_copy_and_move_keep_a_store_whole_and_a_hand_renamed_pair_is_refused_then_repaired(tmp_path):
    store = made(tmp_path / "s.h5")
    before = content(store)
    copied = run_json("store", "copy", store.paths.store, tmp_path / "c" / "copy.h5")
    assert copied["linked"] == copied["partitions"] == 3
    moved = Store(tmp_path / "m.h5")
    Store(tmp_path / "c" / "copy.h5").move(moved.path)
    assert same(content(moved), before) and same(content(store), before)
    assert not (tmp_path / "c" / "copy.h5").exists() and not (tmp_path / "c" / "copy.h5.parts").exists()
    one_line_error(run_cli("store", "copy", store.paths.store, moved.path, check=False), "exists")
    os.link(store.paths.store, tmp_path / "t.h5")  # by hand: the root copied, its folder too
    os.mkdir(tmp_path / "t.h5.parts")
    for name in store.paths.partitions():
        os.link(store.paths.parts / name, tmp_path / "t.h5.parts" / name)
    proc = run_cli("store", "info", tmp_path / "t.h5", check=False)
    one_line_error(proc, "s.h5.parts", "copied or renamed by hand", "pipeline store copy|move", "store repair")
    run_json("store", "repair", tmp_path / "t.h5")
    assert same(content(Store(tmp_path / "t.h5")), before)


def test_an_aborted_transaction_leaves_nothing(tmp_path):
    store = made(tmp_path / "s.h5")
    before, parts = content(store), set(store.paths.partitions())
    with pytest.raises(RuntimeError), store.transaction(SET, ["a", "b"]) as tx:
        tx.add("train", *rows("train", 80, 5))
        raise RuntimeError("stop")
    assert same(content(store), before) and set(store.paths.partitions()) == parts


def test_the_root_write_asks_for_what_the_root_takes(tmp_path):
    store = made(tmp_path / "s.h5")
    drop(store, "train", np.arange(0, 80, 2))  # 40 segments
    with store.read() as snapshot:
        estimate = root_bytes(snapshot.snapshot, store.paths)
    size = os.path.getsize(store.paths.store)
    assert size <= estimate <= 4 * size + (1 << 17)


def test_every_output_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """The atomic writer, spied on (the real calls still run): fsync of the file, rename, fsync of its folder."""
    import stages.atomic as atomic

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        atomic.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    store = Store(tmp_path / "s.h5")
    add(store, "train", 0, 5)
    root = str(store.paths.store)
    at = calls.index(("replace", root))
    assert calls[at - 1][0] == "fsync" and ".s.h5.tmp-" in calls[at - 1][1]
    assert calls[at + 1] == ("fsync", str(tmp_path))
    part = store.paths.parts / store.paths.partitions()[0]
    at = calls.index(("replace", str(part)))
    assert calls[at - 1][0] == "fsync" and calls[at + 1] == ("fsync", str(store.paths.parts))


def test_a_store_written_before_partition_identities_is_read_and_its_next_update_records_them(tmp_path):
    """The release before this one wrote no partition uid and no partition_ids: such a store reads as it is (its
    partitions identified by their string columns' digests), and its first update records every identity."""
    store = made(tmp_path / "s.h5")
    before = content(store)
    for name in store.paths.partitions():
        with h5py.File(store.paths.parts / name, "r+") as f:
            del f.attrs["uid"]
    with h5py.File(store.paths.store, "r+") as f:
        del f[f"sets/{SET}"].attrs["partition_ids"]
    assert same(content(store), before)
    add(store, "valid", 20, 2)
    with h5py.File(store.paths.store, "r") as f:
        recorded = json.loads(f[f"sets/{SET}"].attrs["partition_ids"])
    assert set(recorded) == set(store.paths.partitions())
    assert sum(v.startswith("digest:") for v in recorded.values()) == 3
    other = made(tmp_path / "t.h5", seed=1)
    old = sorted(n for n in store.paths.partitions() if recorded[n].startswith("digest:"))[0]
    with h5py.File(other.paths.parts / other.paths.partitions()[0], "r+") as f:
        del f.attrs["uid"]
    os.replace(other.paths.parts / other.paths.partitions()[0], store.paths.parts / old)
    with pytest.raises(Exception, match="is not the partition this root mapped"):
        store.read()
