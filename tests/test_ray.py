"""featurize --engine ray on a real local Ray cluster of two nodes: the same store as a local run, a worker or the
driver killed mid-job, and the one-line error without the extra."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_same_content, content, make_images, one_line_error, parts, run_cli, run_json, unmapped

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each: blocks are scheduled on both."""
    from ray.cluster_utils import Cluster

    started = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    started.add_node(num_cpus=1)
    started.wait_for_nodes()
    yield started.address
    started.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A generated set with one file that cannot decode, featurized locally for reference: (data, local store)."""
    root = tmp_path_factory.mktemp("ray")
    data = make_images(root / "data", {"train": {"a": 12, "b": 12}, "valid": {"a": 4, "b": 4}})
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run_json("featurize", data, "--store", root / "local.h5")
    return data, root / "local.h5"


def ray_args(data, store, address, *extra):
    return ["featurize", str(data), "--store", str(store), "--engine", "ray", "--ray-address", address, *extra]


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_partition(store, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not parts(store):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no partition committed"
        time.sleep(0.2)


def test_a_worker_killed_mid_block_is_retried_and_the_store_is_a_local_runs(cluster, photos, tmp_path):
    """Two actors on two nodes; one SIGKILLed inside a block: Ray restarts it and retries the block, and the store
    holds what a local run stores (every file once, the broken one skipped with its reason, not retried)."""
    import json

    import psutil

    data, local = photos
    store = tmp_path / "s.h5"
    args = ray_args(data, store, cluster, "--workers", "2", "--commit-every", "2", "--batch-size", "2", "--json")
    proc = _start(args)
    _wait_for_partition(store, proc)  # an actor is inside a block (each is 2 of its commits or more)
    actors = [p for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])]
    assert actors, "no actor process found"
    actors[0].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert out.startswith("{"), (out[:500], err[-1000:])  # --json: stdout is the JSON alone
    result = json.loads(out)
    assert result["engine"] == "ray" and result["worker_peak_rss_mb"] > 0
    assert [s["path"] for s in result["skipped"]] == ["train/a/broken.jpg"]
    assert_same_content(content(store), content(local))  # every file once: content() pairs each path with its rows
    assert not unmapped(store)
    again = run_json(*ray_args(data, store, cluster))
    assert again["up_to_date"] and again["featurized"] == 0  # the broken file is not retried either


def test_a_killed_driver_is_resumed_from_committed_partitions(cluster, photos, tmp_path):
    data, local = photos
    store = tmp_path / "s.h5"
    proc = _start(ray_args(data, store, cluster, "--workers", "1", "--commit-every", "2", "--batch-size", "2"))
    _wait_for_partition(store, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_json(*ray_args(data, store, cluster, "--workers", "2"))
    assert resumed["featurized"] < 32  # the committed partitions were adopted, not computed again
    assert_same_content(content(store), content(local))


def test_engine_options_are_checked_and_ray_missing_is_one_line(photos, tmp_path):
    data, _ = photos
    proc = run_cli("featurize", data, "--store", tmp_path / "s.h5", "--engine", "spark", check=False)
    one_line_error(proc, "--engine", "local, ray")
    proc = run_cli(*ray_args(data, tmp_path / "s.h5", "auto", "--num-shards", "2"), check=False)
    one_line_error(proc, "--engine ray", "--num-shards")
    hidden = tmp_path / "no_ray"
    (hidden / "ray").mkdir(parents=True)
    (hidden / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = run_cli("featurize", data, "--store", tmp_path / "s.h5", "--engine", "ray", check=False, env=env)
    one_line_error(proc, "--engine ray", "pip install -e '.[ray]'")
    assert not (tmp_path / "s.h5").exists()
