"""Sharded featurize: torchrun ranks (gloo on the CPU) and batch-scheduler shards equal one process."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, assert_same_content, content, make_images, parts, run_json

from bench.harness import torchrun_cmd
from store.paths import StorePaths

ARGS = ("--batch-size", "4", "--commit-every", "4", "--views", "1", "--precision", "fp32")

pytestmark = pytest.mark.slow  # every test here runs the CLI on images or kills processes


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    data = make_images(root / "data", {"train": {"a": 6, "b": 6}, "valid": {"a": 2, "b": 2}})
    run_json("featurize", data, "--store", root / "reference.h5", *ARGS)
    return data, content(root / "reference.h5")


def torchrun(data, store, **kwargs):
    command = torchrun_cmd(2, "featurize", data, "--store", store, *ARGS, "--json")
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_torchrun_two_ranks_equal_one_process(shard_set, tmp_path):
    data, reference = shard_set
    proc = torchrun(data, tmp_path / "s.h5")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert [r["shard"] for r in summary["shards"]] == ["rank 0/2", "rank 1/2"]
    assert summary["featurized"] == 16 and summary["reused"] == 0
    assert_same_content(content(tmp_path / "s.h5"), reference)


def test_batch_scheduler_shards_then_a_merge_equal_one_process(shard_set, tmp_path):
    data, reference = shard_set
    store = tmp_path / "s.h5"
    shards = [
        run_json("featurize", data, "--store", store, *ARGS, "--num-shards", "2", "--shard-id", str(i)) for i in (0, 1)
    ]
    assert sum(s["featurized"] for s in shards) == 16 and not store.exists()
    merged = run_json("featurize", data, "--store", store, *ARGS)
    assert merged["featurized"] == 0 and merged["reused"] == 16
    assert_same_content(content(store), reference)


def test_two_ranks_repair_a_store_whose_partition_was_cut_short(shard_set, tmp_path):
    """Both ranks find the damaged partition and set it aside (whichever comes first); rank 0's merge maps the rest
    and what the ranks computed again."""
    data, reference = shard_set
    store = tmp_path / "s.h5"
    run_json("featurize", data, "--store", store, *ARGS)
    paths = StorePaths.of(store)
    damaged = paths.parts / sorted(paths.partitions())[0]
    os.truncate(damaged, os.path.getsize(damaged) // 2)
    proc = torchrun(data, store)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert 0 < summary["featurized"] < 16 and summary["featurized"] + summary["reused"] == 16
    assert damaged.with_name(damaged.name + ".damaged").exists()
    assert_same_content(content(store), reference)


def test_a_killed_rank_stops_the_job_and_a_rerun_completes(shard_set, tmp_path):
    data, reference = shard_set
    store = tmp_path / "s.h5"
    proc = torchrun(data, store)
    deadline = time.monotonic() + 300
    while parts(store) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun starts each rank as its own child (in a session of its own)
    workers = [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one rank dies
    _, err = proc.communicate(timeout=300)  # the job stops rather than hangs
    assert proc.returncode != 0
    rerun = run_json("featurize", data, "--store", store, *ARGS)
    assert rerun["featurized"] < 16
    assert_same_content(content(store), reference)
