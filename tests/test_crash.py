"""Killed featurize runs: the store always opens, and a rerun ends with what an uninterrupted run writes."""

import json
import signal
import subprocess
import sys
import time

import h5py
import pytest
from conftest import REPO, assert_same_content, content, make_images, parts, run_json, unmapped

from store.paths import StorePaths

ARGS = ("--batch-size", "4", "--commit-every", "4", "--views", "1", "--precision", "fp32")

pytestmark = pytest.mark.slow  # every test here runs the CLI on images or kills processes


def start(data, store):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "featurize", str(data), "--store", str(store), *ARGS],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def crash_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_images(root / "data", {"train": {"a": 8, "b": 8, "c": 8}, "valid": {"a": 2, "b": 2, "c": 2}})
    reference = root / "reference.h5"
    run_json("featurize", data, "--store", reference, *ARGS)
    return data, content(reference)


def wait_for(condition, proc, limit=120):
    deadline = time.monotonic() + limit
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the point to stop it at"


def store_being_written(store) -> bool:
    return bool(StorePaths.of(store).temporaries())


def reached(point: str, store, parts_before: int) -> bool:
    if point == "store write":
        return store_being_written(store)
    return point == "start-up" or parts(store) >= parts_before + int(point.split()[0])


# Where a kill lands: at start-up, after the run's 1st, 2nd or 4th commit, or while the root is written.
KILL_POINTS = ("start-up", "1 part", "2 parts", "4 parts", "store write")


def test_twenty_kills_at_journal_points_then_a_rerun_equals_uninterrupted(crash_set, tmp_path):
    """Each run is killed at the next point of its life (polled, not slept for: the same points on any machine);
    a run with no work left at its point is let finish. The store opens after every kill."""
    data, reference = crash_set
    store = tmp_path / "s.h5"
    for trial in range(20):
        point = KILL_POINTS[trial % len(KILL_POINTS)]
        before = parts(store)
        proc = start(data, store)
        deadline = time.monotonic() + 120
        while not reached(point, store, before) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        if store.exists():  # opens without repair, every time, as a whole snapshot
            assert_whole_snapshot(store, reference)
    run_json("featurize", data, "--store", store, *ARGS)
    assert_same_content(content(store), reference)


def assert_whole_snapshot(store, reference):
    """The store opens as one snapshot: every partition it maps is there (no fill values), each image's rows are
    the reference's, and no image has rows twice."""
    import numpy as np

    from store.reader import FeatureStore

    with FeatureStore(store) as opened:  # refuses a root mapping a missing partition
        assert opened.snapshot.version == 2
    _, snapshot = content(store)
    for split, columns in snapshot.items():
        keys = list(zip(columns["paths"], columns["view"]))
        assert len(set(keys)) == len(keys), split
        assert np.isfinite(columns["features"].astype(np.float32)).all(), split
        expected = dict(
            zip(zip(reference[1][split]["paths"], reference[1][split]["view"]), reference[1][split]["features"])
        )
        for key, row in zip(keys, columns["features"]):
            np.testing.assert_allclose(row.astype(np.float32), expected[key].astype(np.float32), atol=1e-2)


def test_kills_while_compacting_or_switching_the_root_leave_the_old_or_the_new_snapshot(crash_set, tmp_path):
    """Files removed (dead rows past the compaction threshold) and added: a featurize killed while compaction writes
    its partition, or while the root is written, leaves a store that opens as a whole snapshot; a rerun equals an
    uninterrupted run."""
    import shutil

    data, _ = crash_set
    data = shutil.copytree(data, tmp_path / "data")
    store = tmp_path / "s.h5"
    run_json("featurize", data, "--store", store, *ARGS)
    for path in sorted((data / "train" / "a").iterdir())[:4]:
        path.unlink()  # 8 of 30 images' rows dead: the partition is compacted
    make_images(tmp_path / "more", {"train": {"a": 3}}, seed=11)
    for path in (tmp_path / "more" / "train" / "a").iterdir():
        path.rename(data / "train" / "a" / f"new-{path.name}")
    reference = tmp_path / "reference.h5"
    run_json("featurize", data, "--store", reference, *ARGS)
    paths = StorePaths.of(store)
    for pattern in (".*c.h5.tmp-{pid}.h5", f".{store.name}.tmp-{{pid}}.h5"):  # a compaction's partition, a root
        proc = start(data, store)
        folder = paths.parts if pattern.startswith(".*") else store.parent
        wait_for(lambda proc=proc, pattern=pattern, folder=folder: any(folder.glob(pattern.format(pid=proc.pid))), proc)
        proc.kill()
        proc.wait()
        assert_whole_snapshot(store, content(reference))
    again = run_json("featurize", data, "--store", store, *ARGS)
    assert again["featurized"] == 0  # the killed runs' work was kept
    assert_same_content(content(store), content(reference))
    assert not unmapped(store)


@pytest.mark.parametrize("point", ["after 3 parts"])
def test_sigkill_then_rerun_equals_uninterrupted(crash_set, tmp_path, point):
    data, reference = crash_set
    store = tmp_path / "s.h5"
    proc = start(data, store)
    wait_for(lambda: parts(store) >= int(point.split()[1]), proc)
    proc.kill()
    proc.wait()
    if store.exists():  # a store left behind always opens without repair
        h5py.File(store, "r").close()
    summary = run_json("featurize", data, "--store", store, *ARGS)
    assert_same_content(content(store), reference)
    if proc.returncode == -signal.SIGKILL:
        assert summary["featurized"] < 30  # resumed from the committed parts, not from scratch
    assert not unmapped(store)  # the killed run's partitions were mapped or, superseded, deleted


def test_ctrl_c_commits_what_is_done(crash_set, tmp_path):
    data, reference = crash_set
    store = tmp_path / "s.h5"
    proc = start(data, store)
    wait_for(lambda: parts(store) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    _, partial = content(store)
    done = sum(len(set(v["paths"])) for v in partial.values())
    assert 0 < done < 30
    summary = run_json("featurize", data, "--store", store, *ARGS)
    assert summary["featurized"] == 30 - done
    assert_same_content(content(store), reference)


def test_train_head_killed_leaves_whole_files_and_reruns_to_the_same_result(tmp_path):
    """A grid killed at start-up, then after its 1st and 3rd run (polled): every file left is whole, and a rerun
    over what the kills left gives the uninterrupted grid's results."""
    from bench.synthetic import separable_features, write_feature_store

    store = write_feature_store(
        tmp_path / "s.h5", separable_features(600, dim=64, views=0), separable_features(100, dim=64)
    )
    grid = ("train-head", "--store", store, "--head", "linear,mlp", "--lr", "1e-2,3e-2", "--epochs", "3")
    grid += ("--batch-size", "16")
    reference = run_json(*grid, "--out", tmp_path / "reference")
    out = tmp_path / "grid"
    for runs_done in (0, 1, 3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *map(str, grid), "--out", str(out), "--overwrite"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if runs_done:
            wait_for(lambda n=runs_done: len(list(out.glob("*/metrics.json"))) >= n, proc)
        proc.kill()
        proc.wait()
        for path in out.rglob("*.json") if out.exists() else []:
            json.loads(path.read_text())  # every file there is whole
    again = run_json(*grid, "--out", out, "--overwrite")  # rerunning replaces what a kill left
    strip = lambda board: [{k: v for k, v in r.items() if k not in ("run", "seconds")} for r in board]  # noqa: E731
    assert strip(again) == strip(reference)
