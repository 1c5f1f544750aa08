"""Killed featurize runs: the store always opens, and a rerun ends with what an uninterrupted run writes."""

import json
import signal
import subprocess
import sys
import time

import h5py
import pytest
from conftest import REPO, assert_same_content, content, make_images, parts, run_json

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


# Where a kill lands: at start-up, after the run's 1st, 2nd or 4th journal commit, or while the store is written.
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
        if store.exists():
            with h5py.File(store, "r") as f:  # opens without repair, every time
                assert f.attrs["schema_version"] == 1
    run_json("featurize", data, "--store", store, *ARGS)
    assert_same_content(content(store), reference)


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
    assert not StorePaths.of(store).journal.exists()


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
