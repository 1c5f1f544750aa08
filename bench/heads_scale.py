"""Heads at scale: train-head on synthetic stores of 1e5 and 1e6 rows against scikit-learn on the same rows.

Each store is 1280-d fp16 rows of 10 Gaussian classes with 2% of the labels moved to the next class
(bench.synthetic.write_blob_store), 10% of them valid. Every side is a whole process that reads the store itself
(scikit-learn with plain h5py, standardized, fp32 in memory: bench/sklearn_heads.py), from a warm page cache (the
file read once just before), alternated so that the machine's minute-to-minute swings fall on both.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.harness import Row, alternate, peak_rss_command, pipeline_cmd, run_json_command
from bench.synthetic import write_blob_store

REFERENCES = {
    "lbfgs": "LogisticRegression(C=1) (lbfgs)",
    "sgd": "SGDClassifier(log_loss, 5 epochs)",
}


def warm(path: Path) -> None:
    """Read the file once, so that every side starts from the same page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def scale_rows(quick: bool) -> list[Row]:
    sizes = (60_000,) if quick else (100_000, 1_000_000)
    rounds = 1 if quick else 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            store = write_blob_store(Path(tmp) / "blobs.h5", n, classes=10, flips=0.02)[0]
            fp16_mb = n * 1280 * 2 / 2**20
            found: dict[str, float] = {}

            def ours(args: tuple, key: str, store=store, found=found):
                def run() -> float:
                    warm(store)
                    command = pipeline_cmd("train-head", "--store", store, *args, "--out", Path(tmp) / key)
                    [result], seconds, peak = peak_rss_command([*command, "--overwrite"])
                    found[key], found[f"{key}_rss"] = result["accuracy"], peak
                    return seconds

                return run

            def reference(kind: str, store=store, found=found):
                def run() -> float:
                    warm(store)
                    command = [sys.executable, "-m", "bench.sklearn_heads", str(store), "-", kind]
                    result, seconds = run_json_command(command)
                    found[kind] = result["score"]
                    return seconds

                return run

            default, lbfgs, pairs_lbfgs = alternate(ours((), "default"), reference("lbfgs"), rounds)
            linear, sgd, pairs_sgd = alternate(
                ours(("--head", "linear", "--epochs", "1"), "linear"), reference("sgd"), rounds
            )
            warm(store)
            grid, grid_s = run_json_command(
                pipeline_cmd("train-head", "--store", store, "--head", "linear", "--lr", "1e-3,3e-3,1e-2,3e-2")
                + ["--wd", "0,1e-4,1e-2", "--out", str(Path(tmp) / "grid"), "--overwrite"]
            )
            warm(store)
            found_lr, lr_find_s = run_json_command(
                pipeline_cmd("lr-find", "--store", store, "--head", "linear", "--out", Path(tmp) / "lr")
            )
            best = min(lbfgs, sgd)
            floor = max(found["lbfgs"], found["sgd"]) - 0.001
            rows += [
                Row(
                    f"default train-head, {n:,} rows, whole process vs the faster scikit-learn reference",
                    default,
                    best,
                    "s",
                    higher_is_better=False,
                    note=f"valid accuracy {found['default']:.4f} (floor {floor:.4f}); lbfgs {lbfgs:.1f} s "
                    f"({found['lbfgs']:.4f}), sgd {sgd:.1f} s ({found['sgd']:.4f}); peak RSS "
                    f"{found['default_rss']:,.0f} MB vs fp16 features + 1 GB {fp16_mb + 1024:,.0f} MB",
                    pairs=pairs_lbfgs,
                ),
                Row(
                    f"train-head --head linear --epochs 1, {n:,} rows, whole process vs the faster reference",
                    linear,
                    best,
                    "s",
                    higher_is_better=False,
                    note=f"valid accuracy {found['linear']:.4f}; peak RSS {found['linear_rss']:,.0f} MB",
                    pairs=pairs_sgd,
                ),
                Row(
                    f"12-run grid (linear, 4 lr x 3 wd, 3 epochs), {n:,} rows, whole process vs the faster reference",
                    grid_s,
                    best,
                    "s",
                    higher_is_better=False,
                    note=f"{grid_s / default:.2f}x the default head (target 3x); best valid accuracy "
                    f"{grid[0]['accuracy']:.4f} (lr {grid[0]['lr']:g}, wd {grid[0]['wd']:g}); one run",
                ),
                Row(
                    f"lr-find (linear, 21 rates), {n:,} rows, whole process vs the faster reference",
                    lr_find_s,
                    best,
                    "s",
                    higher_is_better=False,
                    note=f"{lr_find_s / default:.2f}x the default head; suggests {found_lr['suggestion']:.3g}; one run",
                ),
            ]
    return rows
