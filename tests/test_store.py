"""The store as it grows: updates write partitions and switch the root, readers keep their snapshot, compaction
reclaims dead rows, a version-1 store is taken over without a copy, and plain h5py reads it all as before."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import REPO, assert_same_content, content, make_images, one_line_error, run_cli, run_json, unmapped

from store.paths import StorePaths

pytestmark = pytest.mark.slow  # every test here runs the CLI on images

FAST = ("--batch-size", "8", "--precision", "fp32")


def featurize(data, store, *extra):
    return run_json("featurize", data, "--store", store, *FAST, *extra)


def info(store):
    return run_json("store", "info", store)


def files(store) -> dict[str, tuple[int, int]]:
    """Each partition file with its inode and mtime: what an update must leave alone."""
    paths = StorePaths.of(store)
    return {p: (os.stat(paths.parts / p).st_ino, os.stat(paths.parts / p).st_mtime_ns) for p in paths.partitions()}


def test_the_readme_snippet_reads_a_store_with_plain_h5py_from_anywhere(small_set, tmp_path):
    """The README's snippet, verbatim but for the path: a split is one array, read through the root. The store
    moved (root and partitions folder together) reads the same from another working directory."""
    store = tmp_path / "runs" / "s.h5"
    featurize(small_set, store)
    make_images(tmp_path / "more", {"train": {"a": 2}}, seed=5)  # a second partition
    for path in (tmp_path / "more" / "train" / "a").iterdir():
        path.rename(small_set / "train" / "a" / f"more-{path.name}")
    featurize(small_set, store)
    snippet = re.search(r"<!-- store-snippet -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    probe = (
        snippet + "\nimport numpy as np\nprint(json.dumps([X.shape, int(np.isfinite(X).sum()), y.tolist(), classes]))\n"
    )
    moved = tmp_path / "elsewhere" / "deep"
    moved.mkdir(parents=True)
    for path in (store, StorePaths.of(store).parts):
        shutil.move(path, moved / path.name)
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied)
    for root in (moved / "s.h5", copied / "s.h5"):
        (tmp_path / "probe.py").write_text(probe.replace("runs/dogscats.h5", str(root)))
        proc = subprocess.run(
            [sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True, cwd="/", check=True
        )
        shape, finite, labels, classes = json.loads(proc.stdout)
        assert shape == [17, 1280] and finite == 17 * 1280 and classes == ["a", "b", "c"]
        assert sorted(labels) == [0] * 7 + [1] * 5 + [2] * 5
        run_cli("store", "info", root, "--verify")
        assert run_json("featurize", small_set, "--store", root, *FAST)["up_to_date"]


def feature_chunks(store) -> list[tuple[int, tuple[int, int]]]:
    """Each partition's features datasets: rows and chunk shape."""
    found = []
    for name in StorePaths.of(store).partitions():
        with h5py.File(StorePaths.of(store).parts / name, "r") as part:
            part.visititems(lambda key, o: found.append((len(o), o.chunks)) if key.endswith("features") else None)
    return found


def test_updates_write_new_partitions_only_and_compaction_reclaims_dead_rows(small_set, tmp_path):
    store = tmp_path / "s.h5"
    featurize(small_set, store)
    before = files(store)
    assert len(before) == 1 and info(store)["schema_version"] == 2
    make_images(tmp_path / "more", {"train": {"a": 2}}, seed=9)
    for path in (tmp_path / "more" / "train" / "a").iterdir():
        path.rename(small_set / "train" / "a" / f"new-{path.name}")
    added = featurize(small_set, store)
    after = files(store)
    assert added["featurized"] == 2 and {p: after[p] for p in before} == before and len(after) == 2
    assert all(chunks == (rows, 1280) for rows, chunks in feature_chunks(store))  # a row is read from one chunk
    (small_set / "train" / "b" / "b_001.jpg").unlink()
    removed = featurize(small_set, store)
    assert removed["featurized"] == 0 and files(store) == after  # unmapped at once, nothing written but the root
    [feature_set] = info(store)["sets"]
    assert feature_set["dead_rows"] == 1 and feature_set["live_rows"] == 22
    compacted = run_json("store", "compact", store, "--dead-share", "0")
    assert compacted["rewritten"] == [p for p in before] and compacted["rows_copied"] == 20
    [feature_set] = info(store)["sets"]
    assert feature_set["dead_rows"] == 0 and feature_set["live_rows"] == 22
    assert not (StorePaths.of(store).parts / next(iter(before))).exists()  # no reader held it: deleted
    assert_same_content(content(store), content(featurize_fresh(small_set, tmp_path)))
    assert featurize(small_set, store)["up_to_date"] and not unmapped(store)


def test_compaction_writes_partitions_of_bounded_size_holding_the_same_rows(small_set, tmp_path):
    """A compaction whose rows exceed its target writes several partitions, each as soon as it is full."""
    from store.compact import compact
    from store.locks import StoreLock

    store = tmp_path / "s.h5"
    featurize(small_set, store)
    (small_set / "train" / "b" / "b_001.jpg").unlink()
    featurize(small_set, store)
    with StoreLock(StorePaths.of(store)):
        result = compact(StorePaths.of(store), dead_share=0, target_rows=4)
    assert len(result.written) >= 2 and result.rows_copied == 20  # runs are not split: outputs hold whole ones
    [feature_set] = info(store)["sets"]
    assert feature_set["dead_rows"] == 0 and feature_set["partitions"] == len(result.written)
    assert_same_content(content(store), content(featurize_fresh(small_set, tmp_path)))


def test_a_lost_partition_is_refused_by_readers_and_featurize_computes_only_its_rows_again(small_set, tmp_path):
    store = tmp_path / "s.h5"
    first = featurize(small_set, store)
    make_images(tmp_path / "more", {"train": {"a": 2}}, seed=9)
    for path in (tmp_path / "more" / "train" / "a").iterdir():
        path.rename(small_set / "train" / "a" / f"new-{path.name}")
    featurize(small_set, store)
    other = featurize(small_set, store, "--dtype", "float32")["set"]  # a second feature set, one partition
    parts = StorePaths.of(store).parts
    lost = sorted(p for p in files(store) if not p.startswith(other))[0]
    (parts / lost).rename(tmp_path / lost)  # the first run's partition: 21 images
    for command in (("store", "info", store), ("train-head", "--store", store, "--out", tmp_path / "head")):
        one_line_error(run_cli(*command, check=False), str(store), lost, "missing", "featurize")
    one_line_error(run_cli("featurize", small_set, "--store", store, *FAST, "--dtype", "float32", check=False), lost)
    repaired = featurize(small_set, store)
    assert repaired["featurized"] == first["featurized"] and repaired["reused"] == 2
    assert any(lost in note and "featurized again" in note for note in repaired["notes"])
    assert run_json("store", "info", store, "--verify")["verification"] == []  # nothing failed
    assert featurize(small_set, store)["up_to_date"] and featurize(small_set, store, "--dtype", "float32")["up_to_date"]
    mine = [parts / p for p in files(store) if not p.startswith(other)]
    redone = max(mine, key=os.path.getsize)  # the repair's partition (21 images), beside the one of 2
    os.truncate(redone, os.path.getsize(redone) // 2)
    one_line_error(run_cli("store", "info", store, check=False), redone.name, "cannot be opened", "featurize")
    again = featurize(small_set, store)
    assert again["featurized"] == first["featurized"] and again["reused"] == 2
    assert (parts / f"{redone.name}.damaged").exists() and any(redone.name in note for note in again["notes"])
    assert_same_content(content(store, repaired["set"]), content(featurize_fresh(small_set, tmp_path)))


def featurize_fresh(data, tmp_path):
    fresh = tmp_path / "fresh" / "s.h5"
    featurize(data, fresh)
    return fresh


def to_version_1(store, out):
    """The store written as a version-1 file (every row in the one file, sorted by path and view) by plain h5py, as
    the version before this one wrote it."""
    from store.schema import ROW_COLUMNS, SKIPPED_COLUMNS, STR
    from store.verify import create_checked

    with h5py.File(store, "r") as f, h5py.File(out, "w") as v1:
        v1.attrs["schema_version"] = 1
        for name, group in f["sets"].items():
            target = v1.create_group(f"sets/{name}")
            for key, value in group.attrs.items():
                if key != "partitions":
                    target.attrs[key] = value
            for split in ("train", "valid", "test"):
                if split not in group:
                    continue
                g = target.create_group(split)
                order = np.lexsort((group[split]["view"][()], group[split]["paths"][()]))
                create_checked(g, "features", group[split]["features"][()][order])
                for column, dtype in ROW_COLUMNS.items():
                    values = group[split][column][()][order]
                    create_checked(g, column, values.astype(object) if dtype is STR else values, dtype)
                skipped = g.create_group("skipped")
                for column, dtype in SKIPPED_COLUMNS.items():
                    values = group[split]["skipped"][column][()]
                    create_checked(skipped, column, values.astype(object) if dtype is STR else values, dtype)
    return out


def test_a_version_1_store_is_read_as_it_is_and_taken_over_by_its_first_update(small_set, tmp_path):
    current = tmp_path / "current.h5"
    featurize(small_set, current)
    store = to_version_1(current, tmp_path / "v1.h5")
    inode = os.stat(store).st_ino
    assert info(store)["schema_version"] == 1
    run_json("train-head", "--store", store, "--out", tmp_path / "head")  # read as it is
    again = featurize(small_set, store)
    assert again["up_to_date"] and info(store)["schema_version"] == 1 and os.stat(store).st_ino == inode
    make_images(tmp_path / "more", {"train": {"c": 1}}, seed=4)
    (tmp_path / "more" / "train" / "c" / "c_000.jpg").rename(small_set / "train" / "c" / "new.jpg")
    updated = featurize(small_set, store)
    assert updated["featurized"] == 1 and updated["reused"] == 21
    described = info(store)
    assert described["schema_version"] == 2 and described["partitions"] == 2
    [legacy] = [p for p in StorePaths.of(store).partitions() if p.startswith("legacy-")]
    assert os.stat(StorePaths.of(store).parts / legacy).st_ino == inode  # the old file itself, never copied
    [new] = [p for p in StorePaths.of(store).partitions() if p != legacy]
    (StorePaths.of(store).parts / new).unlink()  # lost: the legacy partition's rows are read under its prefix
    repaired = featurize(small_set, store)
    assert repaired["featurized"] == 1 and repaired["reused"] == 21
    assert_same_content(content(store), content(featurize_fresh(small_set, tmp_path)))
    run_cli("store", "info", store, "--verify")


def test_partitions_a_reader_holds_outlive_compaction(small_set, tmp_path):
    """A reader (ours, or plain h5py with its own file locking) holds the snapshot it opened: compaction leaves the
    partitions it replaced until the reader is done, and the next writer deletes them."""
    from store.reader import FeatureStore

    store = tmp_path / "s.h5"
    featurize(small_set, store)
    first = set(files(store))
    (small_set / "train" / "a" / "a_000.jpg").unlink()
    featurize(small_set, store)  # one row dead (1 of 21: under the threshold, kept)
    for round_, reader in enumerate(("ours", "h5py"), start=1):
        held = FeatureStore(store) if reader == "ours" else h5py.File(store, "r")
        features = (
            held.feature_set().features("train")[()]
            if reader == "ours"
            else held[f"sets/{next(iter(held['sets']))}/train/features"][()]
        )
        compacted = run_json("store", "compact", store, "--dead-share", "0")
        assert compacted["rewritten"] and not compacted["deleted"], reader
        assert all((StorePaths.of(store).parts / p).exists() for p in compacted["rewritten"])
        again = (
            held.feature_set().features("train")[()]
            if reader == "ours"
            else held[f"sets/{next(iter(held['sets']))}/train/features"][()]
        )
        np.testing.assert_array_equal(again, features)  # the reader's snapshot, whole
        held.close()
        deleted = run_json("store", "compact", store)["deleted"]
        assert sorted(deleted) == sorted(compacted["rewritten"]), reader
        (small_set / "train" / "a" / f"a_00{round_}.jpg").unlink()  # a dead row for the next round
        featurize(small_set, store)
    assert not first & set(files(store))


READER = """
import json, sys, time
import h5py, numpy as np
from store.reader import FeatureStore
store, stop = sys.argv[1], sys.argv[2]
reads, problems = 0, []
while True:
    done = __import__("os").path.exists(stop)
    for mode in ("ours", "h5py"):
        try:
            if mode == "ours":
                with FeatureStore(store) as opened:
                    fs = opened.feature_set()
                    x, paths = fs.features("train")[()], fs.column("train", "paths")
            else:
                with h5py.File(store, "r") as f:
                    g = f["sets"][next(iter(f["sets"]))]["train"]
                    x, paths = g["features"][()], g["paths"][()]
            if not np.isfinite(x.astype(np.float32)).all() or len(paths) != len(x) or len(set(paths)) != len(paths):
                problems.append(f"{mode}: inconsistent read of {len(x)} rows")
            reads += 1
        except Exception as exc:
            problems.append(f"{mode}: {exc!r}"[:200])
    if done:
        break
print(json.dumps({"reads": reads, "problems": problems}))
"""


def test_a_reader_looping_over_full_reads_sees_whole_snapshots_while_featurize_commits_and_compacts(tmp_path):
    data = make_images(tmp_path / "data", {"train": {"a": 12, "b": 24}})
    store = tmp_path / "s.h5"
    args = ("--batch-size", "4", "--commit-every", "4", "--precision", "fp32")
    run_json("featurize", data, "--store", store, *args)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(store), str(stop)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    compactions = 0
    for round_ in range(4):  # each round adds images (new partitions) and removes some (dead rows, compaction)
        make_images(tmp_path / f"more{round_}", {"train": {"a": 6}}, seed=20 + round_)
        for path in (tmp_path / f"more{round_}" / "train" / "a").iterdir():
            path.rename(data / "train" / "a" / f"r{round_}-{path.name}")
        for path in sorted((data / "train" / "b").iterdir())[:3]:
            path.unlink()
        result = run_json("featurize", data, "--store", store, *args)
        compactions += bool(result["compaction"]["rewritten"])
        time.sleep(0.2)
    stop.touch()
    out, _ = reader.communicate(timeout=300)
    seen = json.loads(out)
    assert compactions >= 2 and seen["reads"] > 10 and not seen["problems"], seen


def test_a_partition_cut_into_short_runs_is_rewritten_and_a_few_holes_are_not(tmp_path):
    """Fragmentation, not only dead share, makes compaction rewrite a partition (reads through many holes decode
    chunks again and again); a partition with a few holes is left alone."""
    from bench.store_scale import update_v2, write_store
    from store.reader import open_root
    from store.snapshot import read_snapshot

    def mapped(store):
        with open_root(store) as f:
            return read_snapshot(f).partitions()

    store = tmp_path / "s.h5"
    write_store(store, 20_000)  # version 1: taken over as one partition of 18,000 train rows
    update_v2(store, add=False, changed=3)  # train cut in two runs of about 9,000 rows: kept
    [legacy] = mapped(store)
    assert legacy.startswith("legacy-")
    update_v2(store, add=False, changed=10)  # a dozen runs of about 1,500 rows: rewritten
    assert legacy not in mapped(store) and all(name.endswith("c.h5") for name in mapped(store))
    [feature_set] = info(store)["sets"]
    assert feature_set["dead_rows"] == 0 and feature_set["live_rows"] == 20_000 - 13


def test_featurize_rebuilds_a_root_lost_unreadable_or_disagreeing_from_its_partitions(small_set, tmp_path):
    """The root holds no rows, only their mapping: whatever becomes of it, featurize computes nothing again, and
    the store then equals a fresh featurize."""
    store = tmp_path / "s.h5"
    first = featurize(small_set, store)
    make_images(tmp_path / "more", {"train": {"b": 3}}, seed=4)
    for path in (tmp_path / "more" / "train" / "b").iterdir():
        path.rename(small_set / "train" / "b" / f"more-{path.name}")
    featurize(small_set, store)  # two partitions
    fresh = content(featurize_fresh(small_set, tmp_path))
    paths = StorePaths.of(store)
    with h5py.File(store, "r+") as f:  # the segment tables listed in another order than the virtual datasets map
        (name,) = list(f["sets"])
        segments = f[f"sets/{name}/train/segments"]
        assert len(segments) > 1
        segments[...] = segments[()][::-1]
    one_line_error(run_cli("store", "info", store, check=False), "disagrees with itself", "store repair")
    rebuilt = featurize(small_set, store)
    assert rebuilt["featurized"] == 0 and any("rebuilt from its partitions" in n for n in rebuilt["notes"])
    assert_same_content(content(store), fresh)
    store.write_bytes(b"not a root any more")  # unreadable: set aside, rebuilt
    rebuilt = featurize(small_set, store)
    assert rebuilt["featurized"] == 0 and list(paths.parts.glob("root-*.damaged"))
    assert_same_content(content(store), fresh)
    store.unlink()  # lost
    rebuilt = featurize(small_set, store)
    assert rebuilt["featurized"] == 0 and rebuilt["reused"] == first["featurized"] + 3
    assert_same_content(content(store), fresh)
    assert run_json("store", "info", store, "--verify")["verification"] == []


def test_a_sets_record_reads_back_as_written_and_says_its_labelling():
    from stages.identity import FeatureSetIdentity
    from store import SetRecord

    identity = FeatureSetIdentity("efficientnet_lite0", "tf_efficientnet_lite0", "ab" * 32, {"size": 224}, 1280)
    table = SetRecord(
        identity,
        classes=["cat", "dog"],
        data_dir="/data/pets",
        layout="table",
        label_source="table",
        label_origin="/data/pets/labels.csv",
        label_digest="f00d",
        task="multi",
        delim=";",
        updated="2026-12-05T10:00:00",
    )
    attrs = json.loads(json.dumps(table.to_attrs()))  # as a store keeps them (JSON text decoded on read)
    assert SetRecord.from_attrs(attrs) == table
    assert attrs["dtype"] == "float16" and attrs["task"] == "multi"  # the identity's fields beside the rest
    assert table.labelling == {
        "label_source": "table",
        "label_origin": "/data/pets/labels.csv",
        "label_digest": "f00d",
        "task": "multi",
        "delim": ";",
    }
    folders = SetRecord(identity, classes=["cat", "dog"], data_dir="/data/pets", layout="splits")
    assert not {"label_source", "task", "delim"} & set(folders.to_attrs())  # a store before labels-as-data reads so
    assert folders.labelling == {"label_source": "folders", "label_origin": "/data/pets"}
    older = SetRecord.from_attrs({k: v for k, v in folders.to_attrs().items() if k not in ("layout", "created")})
    assert older.layout is None and older.task == "single" and older.identity == identity
