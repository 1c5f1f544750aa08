"""Shared test helpers: generated image sets, the real CLI as a subprocess, the real photos when present."""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.demo import draw_example
from store.paths import StorePaths

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """A real photo set from ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real photos live in ../shared/data)")
    return path


def make_images(root: Path, layout: dict[str, dict[str, int]], seed: int = 0, size=(96, 72)) -> Path:
    """Write generated JPEGs: layout maps split (or '' for no split folder) to {class: count}."""
    rng = np.random.default_rng(seed)
    kinds = ("disks", "stripes", "checkers")
    for split, classes in layout.items():
        for i, (name, count) in enumerate(classes.items()):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                draw_example(kinds[i % len(kinds)], rng, size).save(folder / f"{name}_{k:03d}.jpg", quality=90)
    return root


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def run_cli(*args, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc, *fragments):
    """Exit code 1 and one line on stderr, naming every fragment, with no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def imported_modules(*args) -> set[str]:
    """Top-level modules `pipeline ARGS` imports (python -X importtime), run as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }


def run_json(*args) -> dict:
    return json.loads(run_cli(*args, "--json").stdout)


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test runs two workers): a module's tests stay together, so its module fixtures are
    built once, and every test on the featurized real photos shares one worker, so they are featurized once."""
    for item in items:
        group = "dogscats" if "dogscats_store" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def dogscats_store(tmp_path_factory):
    """The real dogs-vs-cats photos featurized once per session with default settings: (store, summary)."""
    data = shared_dataset("dogscats")
    store = tmp_path_factory.mktemp("real") / "dogscats.h5"
    summary = run_json("featurize", data, "--store", store)
    assert summary["images"] == {"train": 1999, "valid": 999} and not summary["skipped"]
    return store, summary


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small generated set, featurized, with a head trained on it: (data, store, run)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_images(root / "data", {"train": {"a": 8, "b": 8, "c": 8}, "valid": {"a": 4, "b": 4, "c": 4}})
    store = root / "s.h5"
    run_json("featurize", data, "--store", store, "--batch-size", "8")
    run_json("train-head", "--store", store, "--epochs", "8", "--batch-size", "8", "--out", root / "head")
    return data, store, root / "head"


@pytest.fixture
def small_set(tmp_path) -> Path:
    """train 3 classes x 5 images, valid 3 x 2: 21 images."""
    return make_images(tmp_path / "data", {"train": {"a": 5, "b": 5, "c": 5}, "valid": {"a": 2, "b": 2, "c": 2}})


def png_bomb(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG that declares a huge size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


# Killed and sharded featurize runs compare stores by content.
def parts(store):
    """Partition files of a store (each commit of a run makes one)."""
    return len(StorePaths.of(store).partitions())


def unmapped(store) -> list[str]:
    """Partition files the store's root does not map (committed work a finished run leaves none of)."""
    from store.reader import open_root
    from store.snapshot import read_snapshot

    paths = StorePaths.of(store)
    with open_root(paths.store) as f:
        mapped = read_snapshot(f).partitions()
    return [p for p in paths.partitions() if p not in mapped]


def content(store, name: str | None = None):
    """A store's feature set (its one, unless named), split by split, its rows sorted by (path, view): the order rows
    lie in is the store's history (which partition holds them), not part of what it holds."""
    with h5py.File(store, "r") as f:
        if name is None:
            (name,) = list(f["sets"])
        out = {}
        for split, group in f["sets"][name].items():
            columns = {k: group[k][()] for k in ("paths", "labels", "view", "sha256", "features")}
            order = np.lexsort((columns["view"], columns["paths"]))
            out[split] = {k: v[order] for k, v in columns.items()}
        return name, out


def assert_same_content(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for split in a[1]:
        x, y = a[1][split], b[1][split]
        for column in ("paths", "labels", "view", "sha256"):
            assert np.array_equal(x[column], y[column]), (split, column)
        fx, fy = x["features"].astype(np.float32), y["features"].astype(np.float32)
        cosine = (fx * fy).sum(1) / np.linalg.norm(fx, axis=1) / np.linalg.norm(fy, axis=1)
        assert cosine.min() > 0.9999, split


# Programs that libraries we import start once, exec'd at once (never a Python child): torch's CUDA library finder
# runs ldconfig while torch is imported, h5py asks uname for the processor, matplotlib lists fonts with fc-list the
# first time it builds its font cache. Anything else a command starts is a child process of ours.
IMPORT_HELPERS = {"/sbin/ldconfig", "uname", "fc-list"}
_WATCH = """
import sys
children = []
def watch(event, args):
    if event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen"):
        program = str(args[0]) if event in ("subprocess.Popen", "os.posix_spawn", "os.spawn") else event
        children.append(program)
sys.addaudithook(watch)
import atexit
atexit.register(lambda: sys.stderr.write("CHILDREN " + repr(children) + "\\n"))
sys.argv = ["pipeline", *sys.argv[1:]]
from pipeline.cli import main
main()
"""


def run_cli_watching_children(*args, check: bool = True) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `pipeline ARGS` as run_cli does, recording every child process it starts (a Python audit hook: forks,
    spawns, subprocesses), less the import-time helpers above."""
    proc = subprocess.run(
        [sys.executable, "-c", _WATCH, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("CHILDREN ")][-1]
    children = [c for c in ast.literal_eval(line[len("CHILDREN ") :]) if c not in IMPORT_HELPERS]
    return proc, children


def copy_store(store, folder: Path) -> Path:
    """A copy of a store (its root and its partitions folder, their names kept) in another folder."""
    import shutil

    paths = StorePaths.of(store)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths.store, folder / paths.store.name)
    if paths.parts.is_dir():
        shutil.copytree(paths.parts, folder / paths.parts.name)
    return folder / paths.store.name


def stored(store, dataset: str) -> tuple[Path, str]:
    """The partition file and the dataset in it that hold the first rows of a store's dataset ("train/labels",
    "valid/skipped/paths"): where a test edits or damages stored bytes (the root only maps them)."""
    from store.reader import FeatureStore
    from store.snapshot import source_dataset

    with FeatureStore(store) as opened:
        [name] = opened.set_names
        snap = opened.snapshot.sets[name]
    split, _, column = dataset.partition("/")
    subgroup, _, column = column.rpartition("/")
    segment = (snap.skipped if subgroup else snap.rows)[split][0]
    path = StorePaths.of(store).parts / segment.partition
    return path, source_dataset(snap.prefixes[segment.partition], segment.split, column, subgroup)
