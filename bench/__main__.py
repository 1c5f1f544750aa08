"""python -m bench [featurize heads stream scale accuracy] [--quick]: figures beside a reference from the same run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.gpu import bench_gpu
from bench.harness import SHARED, Row, alternate, peak_rss_command, pipeline_cmd, report, run_json_command
from bench.heads_scale import scale_rows
from pipeline.runtime import configure_process


def photo_folder(tmp: Path, quick: bool) -> tuple[Path, str]:
    """DATA_DIR whose valid/ is dogscats/valid (999 photos; 64 in quick mode), or generated images without it."""
    source = SHARED / "dogscats" / "valid"
    data = tmp / "photos"
    if source.is_dir():
        if quick:
            for cls in ("cats", "dogs"):
                (data / "valid" / cls).mkdir(parents=True)
                for f in sorted((source / cls).iterdir())[:32]:
                    (data / "valid" / cls / f.name).symlink_to(f)
        else:
            data.mkdir()
            (data / "valid").symlink_to(source)
        return data, f"dogscats/valid{' (64 photos)' if quick else ''}"
    from pipeline.demo import make_demo_images

    make_demo_images(data, {"valid": 20 if quick else 300})
    return data, "generated images (../shared/data absent)"


def bench_featurize(quick: bool) -> dict:
    """Ours (default and fp32) against torchvision ImageFolder+DataLoader fp32 and the backbone-alone bound."""
    import torch

    from stages.backbones import cpu_has_bf16, create_backbone
    from stages.runner import FeatureRunner

    tmp = Path(tempfile.mkdtemp())
    data, label = photo_folder(tmp, quick)
    pairs = 1 if quick else 3
    count = [0]
    walls: dict[str, list[float]] = {"ours": [], "reference": []}

    def ours(*extra):
        def run():
            count[0] += 1
            summary, wall = run_json_command(
                pipeline_cmd("featurize", data, "--store", tmp / f"s{count[0]}.h5", *extra)
            )
            walls["ours"].append(wall)
            return summary["images_per_second"]

        return run

    def reference():
        result, wall = run_json_command(
            [sys.executable, "bench/reference_featurize.py", str(data / "valid"), "--out", str(tmp / "reference.npy")]
        )
        walls["reference"].append(wall)
        return result["images_per_second"]

    default, ref, default_pairs = alternate(ours(), reference, pairs)
    whole = {k: float(np.median(v)) for k, v in walls.items()}
    _, rerun_wall = run_json_command(pipeline_cmd("featurize", data, "--store", tmp / "s1.h5"))
    import_walls = [
        run_json_command([sys.executable, "-c", "import torch, json; print(json.dumps({}))"])[1] for _ in range(pairs)
    ]
    fp32, ref32, fp32_pairs = alternate(ours("--precision", "fp32"), reference, pairs)
    # A few new photos, as a user adds them: the backbone's frozen trace from the user's cache (what every run
    # after the first gets) against an empty cache (the first run on a machine builds and traces the backbone).
    few = tmp / "few"
    for photo in sorted((data / "valid").rglob("*.jpg"))[:8]:
        (few / "valid" / photo.parent.name).mkdir(parents=True, exist_ok=True)
        (few / "valid" / photo.parent.name / photo.name).symlink_to(photo.resolve())
    cache_walls = {"warm": [], "cold": []}
    for i in range(pairs):
        for kind in cache_walls:
            env = {"XDG_CACHE_HOME": str(tmp / f"empty-cache-{i}")} if kind == "cold" else None
            store = tmp / f"few-{kind}-{i}.h5"
            cache_walls[kind].append(run_json_command(pipeline_cmd("featurize", few, "--store", store), env)[1])

    # The bound: the same backbone on ready tensors, same precision and process settings as ours.
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    backbone = create_backbone()
    images = torch.rand(32, 3, 224, 224) * 2 - 1
    bounds = {}
    # bf16 only where the CPU computes it natively (elsewhere it is emulated, 30x slower, and never the default).
    for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        run = FeatureRunner.for_model(backbone.model, "cpu", precision, 224)
        run(images)
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < (1 if quick else 15):
            run(images)
            n += len(images)
        bounds[precision] = n / (time.perf_counter() - started)

    reference_features = np.load(tmp / "reference.npy")
    cosines = {}
    for store_index, precision in ((pairs * 2, "fp32"), (1, "default")):
        import h5py

        with h5py.File(tmp / f"s{store_index}.h5", "r") as f:
            (name,) = list(f["sets"])
            ours_features = f["sets"][name]["valid"]["features"][()].astype(np.float32)
            used = f["sets"][name].attrs["precision"]
        cos = (ours_features * reference_features).sum(1) / (
            np.linalg.norm(ours_features, axis=1) * np.linalg.norm(reference_features, axis=1)
        )
        cosines[f"{precision} ({used})"] = float(cos.min())
    shutil.rmtree(tmp)
    rows = [
        Row("featurize default vs torchvision fp32, loop", default, ref, "img/s", note=label, pairs=default_pairs),
        Row(
            "featurize default vs torchvision fp32, whole process (start-up included)",
            whole["ours"],
            whole["reference"],
            "s",
            higher_is_better=False,
            note="median wall; target >= 3x",
        ),
        Row(
            "up-to-date featurize rerun vs `python -c 'import torch'`, wall",
            rerun_wall,
            min(import_walls),
            "s",
            higher_is_better=False,
            note="target ratio >= 0.67x (at most 1.5x the import)",
        ),
        Row(
            "featurize 8 new photos, whole process: trace cache warm vs empty",
            float(np.median(cache_walls["warm"])),
            float(np.median(cache_walls["cold"])),
            "s",
            higher_is_better=False,
            note="median wall; empty: the backbone built, folded, traced and frozen, as on a machine's first run",
        ),
        Row("featurize fp32 vs torchvision fp32", fp32, ref32, "img/s", pairs=fp32_pairs),
        Row("featurize fp32 vs fp32 backbone-alone bound", fp32, bounds["fp32"], "img/s", note="target >= 0.8x"),
        Row(
            "featurize default vs the default precision's backbone-alone bound",
            default,
            bounds["bf16" if cpu_has_bf16() else "fp32"],
            "img/s",
            note=f"native bf16: {cpu_has_bf16()}",
        ),
        *[
            Row(f"min cosine to torchvision features, {k}", v, None, "", note="fp32 target >= 0.999")
            for k, v in cosines.items()
        ],
    ]
    if importlib.util.find_spec("ray") is not None:  # the ray extra
        rows += ray_rows(quick)
    return report("featurize" + ("-quick" if quick else ""), rows)


def bench_ray(quick: bool) -> dict:
    """The Ray rows of bench featurize alone (ray_rows)."""
    return report("ray" + ("-quick" if quick else ""), ray_rows(quick))


def ray_rows(quick: bool) -> list[Row]:
    """featurize --engine ray against --engine local on the same photos: one actor with every core, on a local Ray
    instance started by the command itself (what a first user on a laptop sees); loop, whole process, peak RSS."""
    tmp = Path(tempfile.mkdtemp())
    data, label = photo_folder(tmp, quick)
    engines: dict[str, list] = {"ray": [], "local": []}
    for i in range(1 if quick else 2):
        for engine in engines:
            store = tmp / f"engine-{engine}-{i}.h5"
            engines[engine].append(
                peak_rss_command(pipeline_cmd("featurize", data, "--store", store, "--engine", engine))
            )
    shutil.rmtree(tmp)
    rate = {e: float(np.median([r["images_per_second"] for r, _, _ in runs])) for e, runs in engines.items()}
    wall = {e: float(np.median([w for _, w, _ in runs])) for e, runs in engines.items()}
    driver = max(p for _, _, p in engines["ray"])
    actor = max(r["worker_peak_rss_mb"] or 0 for r, _, _ in engines["ray"])
    local = max(p for _, _, p in engines["local"])
    rows = [
        Row(
            "featurize --engine ray vs local, loop",
            rate["ray"],
            rate["local"],
            "img/s",
            note=f"{label}; target >= 0.85x",
        ),
        Row(
            "featurize --engine ray vs local, whole process",
            wall["ray"],
            wall["local"],
            "s",
            higher_is_better=False,
            note=f"start-up overhead {wall['ray'] - wall['local']:.1f} s; peak RSS driver {driver:,.0f} MB, actor "
            f"{actor:,.0f} MB, local {local:,.0f} MB",
        ),
    ]
    return rows


def bench_heads(quick: bool) -> dict:
    """train-head and the 24-run grid against the featurize they reuse, the rerun against a run; then heads at 1e5
    and 1e6 rows against scikit-learn (bench/heads_scale.py)."""
    tmp = Path(tempfile.mkdtemp())
    source = SHARED / "dogscats"
    if source.is_dir() and not quick:
        data, label = source, "dogscats (2998 photos)"
    else:
        from pipeline.demo import make_demo_images

        data, label = make_demo_images(tmp / "data", {"train": 20, "valid": 10}), "generated (90 images)"
    store = tmp / "s.h5"
    views = "1" if quick else "4"  # the grid below trains on views 0 and 4
    first, first_wall = run_json_command(pipeline_cmd("featurize", data, "--store", store, "--views", views))
    rerun, rerun_wall = run_json_command(pipeline_cmd("featurize", data, "--store", store, "--views", views))
    head, head_wall = run_json_command(pipeline_cmd("train-head", "--store", store, "--out", tmp / "head"))
    grid_args = (
        ["--head", "linear", "--lr", "1e-2", "--views", f"0,{views}"]
        if quick
        else ["--head", "linear,mlp", "--lr", "3e-3,1e-2,3e-2", "--wd", "0,1e-4", "--views", f"0,{views}"]
    )
    grid, grid_wall = run_json_command(pipeline_cmd("train-head", "--store", store, *grid_args, "--out", tmp / "grid"))
    shutil.rmtree(tmp)
    recompute = len(grid) * (first_wall + head_wall)
    rows = [
        Row(
            f"featurize (first run, --views {views}), wall",
            first_wall,
            None,
            "s",
            higher_is_better=False,
            note=f"{label}; {first['images_per_second']} img/s",
        ),
        Row(
            "featurize rerun vs first run, wall",
            rerun_wall,
            first_wall,
            "s",
            higher_is_better=False,
            note=f"up to date: {rerun['up_to_date']}",
        ),
        Row(
            "default train-head, wall vs featurize wall",
            head_wall,
            first_wall,
            "s",
            higher_is_better=False,
            note=f"valid accuracy {head[0]['accuracy']:.4f}",
        ),
        Row(
            f"{len(grid)}-run grid vs {len(grid)} x (featurize + head)",
            grid_wall,
            recompute,
            "s",
            higher_is_better=False,
            note=f"best {grid[0]['head']} lr {grid[0]['lr']:g} wd {grid[0]['wd']:g}: {grid[0]['accuracy']:.4f}",
        ),
    ]
    rows += scale_rows(quick)
    return report("heads" + ("-quick" if quick else ""), rows, {"leaderboard": grid})


def bench_stream(quick: bool) -> dict:
    """train-head on N x 1280 float16 stores streamed from HDF5: peak RSS per size under --max-memory 256M (it must
    not grow with N), and the streamed rate beside plain h5py's read rate."""
    import h5py

    from bench.synthetic import SET_NAME, write_blob_store

    tmp = Path(tempfile.mkdtemp())
    limit = "256M"
    sizes = (20_000, 40_000) if quick else (100_000, 200_000, 1_000_000)

    def peak(store: Path) -> tuple[float, float]:
        _, wall, peak_mb = peak_rss_command(
            pipeline_cmd("train-head", "--store", store, "--max-memory", limit, "--out", tmp / "run", "--overwrite")
        )
        return peak_mb, wall

    constant, _ = peak(write_blob_store(tmp / "tiny.h5", 2_000)[0])
    rows = []
    for n in sizes:
        store = write_blob_store(tmp / "big.h5", n)[0]
        peak_mb, wall = peak(store)
        rows.append(
            Row(
                f"train-head (default logreg) streamed, {n:,} x 1280 fp16, --max-memory {limit}: peak RSS vs the same "
                "on 2,000 rows",
                peak_mb,
                constant,
                "MB",
                higher_is_better=False,
                note=f"{peak_mb - 256:.0f} MB over the limit; {wall:.0f} s",
            )
        )
    n = sizes[-1]

    def h5py_rate() -> float:
        started = time.perf_counter()
        with h5py.File(store, "r") as f:
            ds = f[f"sets/{SET_NAME}/train/features"]
            for i in range(0, ds.shape[0], 16384):
                ds[i : i + 16384]
        return ds.shape[0] / (time.perf_counter() - started)

    def train_rate() -> float:
        result, _ = run_json_command(
            pipeline_cmd(
                "train-head",
                "--store",
                store,
                "--head",
                "linear",
                "--epochs",
                "1",
                "--no-calibrate",
                "--max-memory",
                "1M",
                "--out",
                tmp / "linear",
                "--overwrite",
            )
        )
        metrics = json.loads((Path(result[0]["run"]) / "metrics.json").read_text())
        return n * 0.9 / metrics["train_seconds"]

    ours, ref, pairs = alternate(train_rate, h5py_rate, 1 if quick else 3)
    shutil.rmtree(tmp)
    rows.append(
        Row(
            f"train-head streamed (linear, 1 epoch, {n:,} x 1280 fp16) vs h5py sequential read",
            ours,
            ref,
            "rows/s",
            note="train includes a standardization pass",
            pairs=pairs,
        )
    )
    return report("stream" + ("-quick" if quick else ""), rows)


def bench_checksums(quick: bool) -> dict:
    """What Fletcher-32 checksums cost: sequential h5py reads of the same features with and without them, and
    featurize's full verification pass over a store."""
    import h5py

    from bench.synthetic import write_feature_store
    from store.verify import verify_split

    n = 20_000 if quick else 1_000_000
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, 1280), dtype=np.float32).astype(np.float16)
    split = (features, np.zeros(n, np.int32), np.zeros(n, np.uint8))
    stores = {
        flag: write_feature_store(tmp / f"{flag}.h5", split, chunk_rows=1024, checksums=flag) for flag in (True, False)
    }
    del features

    def read_rate(flag: bool):
        def run() -> float:
            started = time.perf_counter()
            with h5py.File(stores[flag], "r") as f:
                ds = f["sets/efficientnet_lite0-test/train/features"]
                for i in range(0, n, 16384):
                    ds[i : i + 16384]
            return n / (time.perf_counter() - started)

        return run

    checked, plain, pairs = alternate(read_rate(True), read_rate(False), 1 if quick else 3)
    with h5py.File(stores[True], "r") as f:
        started = time.perf_counter()
        verify_split(f["sets/efficientnet_lite0-test/train"])
        verify = time.perf_counter() - started
    shutil.rmtree(tmp)
    return report(
        "checksums" + ("-quick" if quick else ""),
        [
            Row(
                f"h5py sequential read, {n:,} x 1280 fp16, with Fletcher-32 vs without",
                checked,
                plain,
                "rows/s",
                pairs=pairs,
                note="train-head's streamed reads and featurize's copies pay this",
            ),
            Row(
                f"featurize's verification pass over {n:,} rows (checksums and NaN check)",
                n / verify,
                None,
                "rows/s",
                note=f"{verify:.2f} s",
            ),
        ],
    )


def bench_rss(quick: bool) -> dict:
    """Featurize peak RSS and img/s on generated sets of two sizes: memory must not grow with N."""
    from pipeline.demo import make_demo_images

    sizes = (60, 120) if quick else (1_000, 20_000)
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp())
        data = make_demo_images(tmp / "data", {"train": n // 3})
        summary, wall, peak = peak_rss_command(pipeline_cmd("featurize", data, "--store", tmp / "s.h5"))
        rows.append(Row(f"featurize {n:,} generated images: img/s", summary["images_per_second"], None, "img/s"))
        rows.append(
            Row(
                f"featurize {n:,} generated images: peak RSS",
                peak,
                None,
                "MB",
                higher_is_better=False,
                note=f"wall {wall:.0f} s",
            )
        )
        shutil.rmtree(tmp)
    return report("rss" + ("-quick" if quick else ""), rows)


def bench_scale(quick: bool) -> dict:
    """Store updates and reads at 1e5, 1e6 and 1e7 rows, version 1 against version 2, and the up-to-date check
    over a million files (bench/store_scale.py)."""
    from bench.store_scale import bench_store_scale

    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP")))
    try:
        rows = bench_store_scale(quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = os.environ.get("BENCH_SCALE_SIZES")
    return report("scale" + (f"-{sizes.replace(',', '-')}" if sizes else "") + ("-quick" if quick else ""), rows)


def bench_labels(quick: bool) -> dict:
    """Relabelling and renaming 1% of a store's images at 1e5 and 1e6 rows: nothing decoded (bench/labels.py)."""
    from bench.labels import bench_labels_rows

    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP")))
    try:
        rows = bench_labels_rows(quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report("labels" + ("-quick" if quick else ""), rows)


GRID_LRS, GRID_EPOCHS = ("3e-3", "1e-2", "3e-2"), ("3", "10", "30")


def accuracy_sets(tmp: Path, quick: bool) -> list[tuple[str, Path]]:
    """dogscats and flowers5 from ../shared/data where present (not in quick mode), and the demo set."""
    from pipeline.demo import make_demo_images

    sets = [] if quick else [(name, SHARED / name) for name in ("dogscats", "flowers5") if (SHARED / name).is_dir()]
    return sets + [("demo", make_demo_images(tmp / "demo"))]


FINETUNE_RECORD = ("accuracy", "before", "history", "train_images_per_second", "temperature", "calibration_images")


def bench_accuracy(quick: bool) -> dict:
    """Per data set: the default head against the best linear run of a grid, lr-find's suggestion against the grid's
    best rate, calibration (ECE, the most confident mistake) and the default fine-tune."""
    tmp = Path(tempfile.mkdtemp())
    rows, record = [], {}
    for name, data in accuracy_sets(tmp, quick):
        store = tmp / f"{name}.h5"
        run_json_command(pipeline_cmd("featurize", data, "--store", store))
        default, head_wall = run_json_command(
            pipeline_cmd("train-head", "--store", store, "--out", tmp / name / "head")
        )
        grid, grid_wall = run_json_command(
            pipeline_cmd(
                "train-head",
                "--store",
                store,
                "--head",
                "linear",
                "--lr",
                ",".join(GRID_LRS),
                "--epochs",
                ",".join(GRID_EPOCHS),
                "--no-calibrate",
                "--out",
                tmp / name / "grid",
            )
        )
        by_loss = min(grid, key=lambda r: r["valid_loss"])
        # lr-find probes with the run's epochs (3 by default): the rate it should find is the best at that budget.
        same_budget = min((r for r in grid if r["epochs"] == 3), key=lambda r: r["valid_loss"])
        found, _ = run_json_command(pipeline_cmd("lr-find", "--store", store, "--out", tmp / name / "lr"))
        evaluated, _ = run_json_command(pipeline_cmd("evaluate", default[0]["run"], data / "valid", "--store", store))
        ft, ft_wall = run_json_command(
            pipeline_cmd("finetune", data, "--head", default[0]["run"], "--out", tmp / name / "ft")
        )
        ft_eval, _ = run_json_command(pipeline_cmd("evaluate", ft["run"], data / "valid"))
        ratio = found["suggestion"] / same_budget["lr"]
        overall = found["suggestion"] / by_loss["lr"]
        rows += [
            Row(
                f"{name}: default train-head vs best linear run of the grid, valid accuracy",
                default[0]["accuracy"],
                grid[0]["accuracy"],
                "",
                note=f"logreg l2 {default[0]['l2']:.2g} in {head_wall:.1f} s; grid best "
                f"lr {grid[0]['lr']:g} epochs {grid[0]['epochs']} ({len(grid)} runs, {grid_wall:.0f} s)",
            ),
            Row(
                f"{name}: default train-head vs best grid run, valid log loss",
                default[0]["valid_loss"],
                by_loss["valid_loss"],
                "",
                higher_is_better=False,
                note=f"grid best by loss: lr {by_loss['lr']:g} epochs {by_loss['epochs']}",
            ),
            Row(
                f"{name}: lr-find suggestion vs the grid's best lr at 3 epochs (by valid loss)",
                found["suggestion"],
                same_budget["lr"],
                "lr",
                note=f"factor {max(ratio, 1 / ratio):.2f} (target <= 3); against the best "
                f"of all epochs (lr {by_loss['lr']:g}): factor {max(overall, 1 / overall):.2f}",
            ),
            Row(
                f"{name}: default head calibration, ECE (15 bins)",
                evaluated["ece"],
                None,
                "",
                higher_is_better=False,
                note=f"most confident mistake p = {evaluated['max_wrong_probability']}; "
                f"temperature {default[0]['temperature']:.3f}",
            ),
            Row(
                f"{name}: default finetune vs the head it starts from, valid accuracy",
                ft["accuracy"],
                ft["before"]["accuracy"],
                "",
                note=f"{ft_wall / 60:.1f} min wall, "
                f"{ft['train_images_per_second']:.1f} img/s training; ECE after {ft_eval['ece']:.4f} ("
                + (
                    f"temperature {ft['temperature']:.3f} fitted on {ft['calibration_images']} held-out train images"
                    if ft["calibration_images"]
                    else f"the starting head kept, with its own temperature {ft['temperature']:.3f}"
                )
                + "), "
                f"most confident mistake p = {ft_eval['max_wrong_probability']}",
            ),
        ]
        record[name] = {
            "default": default[0],
            "grid": grid,
            "lr_find": found["suggestion"],
            "ece": evaluated["ece"],
            "finetune": {k: ft[k] for k in FINETUNE_RECORD},
            "finetune_wall_s": ft_wall,
            "finetune_ece": ft_eval["ece"],
        }
    shutil.rmtree(tmp)
    return report("accuracy" + ("-quick" if quick else ""), rows, {"sets": record})


def bench_export(quick: bool) -> dict:
    """The exported ONNX model in a Pillow + onnxruntime script against `pipeline predict` on the same photos."""
    tmp = Path(tempfile.mkdtemp())
    data, label = photo_folder(tmp, quick)
    # A head to export (its accuracy is not measured here): train on copies, since a file reached from both splits
    # is stored once, in train.
    shutil.copytree(data / "valid", data / "train")
    run_json_command(pipeline_cmd("featurize", data, "--store", tmp / "s.h5"))
    run_json_command(pipeline_cmd("train-head", "--store", tmp / "s.h5", "--out", tmp / "head"))
    exported, export_wall = run_json_command(pipeline_cmd("export", tmp / "head", "--out", tmp / "model.onnx"))
    walls, classes = {}, {}

    def deployed():
        result, walls["onnx"] = run_json_command(
            [sys.executable, "bench/onnx_predict.py", str(tmp / "model.onnx"), str(data / "valid")]
        )
        classes["onnx"] = {str(Path(p).resolve()): c for p, c in result["classes"].items()}
        return result["images_per_second"]

    def predict():
        result, walls["predict"] = run_json_command(pipeline_cmd("predict", tmp / "head", data / "valid"))
        classes["predict"] = {str(Path(r["path"]).resolve()): r["class"] for r in result["predictions"]}
        return result["images_per_second"]

    pairs = 1 if quick else 3
    onnx_rate, predict_rate, rate_pairs = alternate(deployed, predict, pairs)
    rows = [
        Row(
            f"exported ONNX (Pillow + onnxruntime script) vs pipeline predict, {label}, loop",
            onnx_rate,
            predict_rate,
            "img/s",
            pairs=rate_pairs,
            note=f"whole process, last pair: {walls['onnx']:.1f} s vs {walls['predict']:.1f} s; export took "
            f"{export_wall:.0f} s, {exported['bytes'] / 2**20:.1f} MB",
        ),
        Row(
            f"top-1 agreement of the ONNX script with pipeline predict, {label}",
            float(np.mean([classes["onnx"][p] == c for p, c in classes["predict"].items()])),
            note=f"{len(classes['predict'])} photos; the ONNX script decodes with Pillow, predict with DALI",
        ),
    ]
    shutil.rmtree(tmp)
    return report("export" + ("-quick" if quick else ""), rows, {"export": exported})


def bench_audit(quick: bool) -> dict:
    """pipeline audit on generated N x 1280 stores with planted label flips and near-copies: beside the
    near-neighbour search a user would reach for (scikit-learn's brute-force cosine kNN, neighbours only) where
    that can run; the approximate similarity search against the exact scan on the same rows; and the whole audit
    at one and two million rows, its steps timed, its peak RSS, the planted faults it finds."""
    import faiss
    import h5py
    from sklearn.neighbors import NearestNeighbors

    from bench.synthetic import SET_NAME, write_blob_store
    from stages.audit import CopyGroups, approximate_scan, exact_scan

    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP")))
    rows = []

    def audited_store(n: int) -> tuple[dict, float, float, set, set]:
        store, flipped, planted = write_blob_store(tmp / f"s{n}.h5", n, valid_share=0.2, flips=0.01, copies=0.005)
        result, wall, peak = peak_rss_command(
            pipeline_cmd("audit", "--store", store, "--out", tmp / f"a{n}", "--pictures", "0")
        )
        return result, wall, peak, flipped, planted

    def found(result: dict, flipped: set, planted: set) -> str:
        issues = {i["path"] for i in result["label_issues"]}
        pairs = {tuple(sorted((d["a"], d["b"]))) for d in result["duplicates"]}
        copies = len({tuple(sorted(p)) for p in planted} & pairs)
        return (
            f"planted label flips found {len(issues & flipped)}/{len(flipped)}, near-copies {copies}/{len(planted)}; "
            f"{result['similarity_search']} search; steps {result['step_seconds']}"
        )

    for n in (2_000,) if quick else (10_000,):
        result, wall, peak, flipped, planted = audited_store(n)
        with h5py.File(tmp / f"s{n}.h5", "r") as f:
            features = np.concatenate([g["features"][()] for g in f[f"sets/{SET_NAME}"].values()]).astype(np.float32)
        started = time.perf_counter()
        NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(features).kneighbors(features)
        knn = time.perf_counter() - started
        rows.append(
            Row(
                f"audit of {n:,} generated rows (1280-d, 5 classes), whole process, vs scikit-learn brute-force "
                "cosine kNN alone",
                wall,
                knn,
                "s",
                higher_is_better=False,
                note=found(result, flipped, planted) + f"; peak RSS {peak:,.0f} MB",
            )
        )
    n = 5_000 if quick else 100_000
    store, _, _ = write_blob_store(tmp / "recall.h5", n, copies=0.005)
    with h5py.File(store, "r") as f:
        features = np.concatenate([g["features"][()] for g in f[f"sets/{SET_NAME}"].values()]).astype(np.float32)
    started = time.perf_counter()
    exact, exact_nearest = exact_scan(features)
    exact_seconds = time.perf_counter() - started
    started = time.perf_counter()
    approximate, nearest = approximate_scan(faiss, features, 0.92, 5, CopyGroups(n))
    approximate_seconds = time.perf_counter() - started
    truth = {(a, b) for g in exact.groups() for a, b, _ in g.pairs}
    got = {(a, b) for g in approximate.groups() for a, b, _ in g.pairs}
    rows += [
        Row(
            f"near-copy pairs at {n:,} rows: approximate search found / exact scan found",
            len(truth & got) / max(1, len(truth)),
            None,
            "share",
            note=f"{len(truth)} pairs at cosine >= 0.92; neighbour similarity off by more than 0.01 for "
            f"{float(np.mean(exact_nearest - nearest > 0.01)):.2%} of rows",
        ),
        Row(
            f"similarity search at {n:,} rows: approximate (faiss) vs exact scan",
            approximate_seconds,
            exact_seconds,
            "s",
            higher_is_better=False,
        ),
    ]
    del features
    for n in (20_000,) if quick else (1_000_000, 2_000_000):
        result, wall, peak, flipped, planted = audited_store(n)
        (tmp / f"s{n}.h5").unlink()  # the next store's room
        rows += [
            Row(
                f"audit of {n:,} generated rows (1280-d fp16), whole process",
                wall,
                None,
                "s",
                higher_is_better=False,
                note=found(result, flipped, planted),
            ),
            Row(
                f"audit of {n:,} rows: peak RSS vs their float16 features",
                peak,
                n * 1280 * 2 / 2**20,
                "MB",
                higher_is_better=False,
                note="target at 1,000,000 rows: 8 GB (the audit before reading in blocks: 20.2 GB)",
            ),
            Row(
                f"audit of {n:,} rows: out-of-sample probabilities (5-fold logreg) and confident learning",
                result["step_seconds"]["label_issues"],
                None,
                "s",
                higher_is_better=False,
            ),
        ]
    shutil.rmtree(tmp)
    return report("audit" + ("-quick" if quick else ""), rows)


def bench_finetune(quick: bool) -> dict:
    """Fine-tuning training steps (forward, backward, AdamW) on ready tensors, img/s: the layouts and precisions
    this CPU offers, against the plain NCHW fp32 step (what finetune ran before)."""
    import torch

    from stages.backbones import BF16_TRAINING_SPEEDUP, cpu_has_bf16, create_backbone
    from stages.finetune import Finetuner
    from stages.head import Head
    from stages.settings import FinetuneConfig, HeadSpec

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    seconds = 3 if quick else 20

    def steps_per_second(size: int, channels_last: bool, precision: str) -> float:
        backbone = create_backbone()
        head = Head.from_spec(HeadSpec("linear", 1280, 5, 0, 0.0))
        tuner = Finetuner(backbone, head, FinetuneConfig(precision=precision), "cpu", Path(tempfile.mkdtemp()))
        if not channels_last:
            tuner.model.to(memory_format=torch.contiguous_format)
        tuner.model.train()
        images = torch.rand(32, 3, size, size) * 2 - 1
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 5, (32,))

        def step():
            with tuner.autocast():
                loss = torch.nn.functional.cross_entropy(tuner.model(images).float(), labels)
            tuner.optimizer.zero_grad()
            loss.backward()
            tuner.optimizer.step()

        step()
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            step()
            n += len(images)
        return n / (time.perf_counter() - started)

    before = steps_per_second(224, False, "fp32")
    rows = [
        Row(
            "finetune step, 224 px fp32 channels_last vs NCHW",
            steps_per_second(224, True, "fp32"),
            before,
            "img/s",
            note="batch 32, Lite0 + linear head, AdamW",
        )
    ]
    for size in (160, 128):
        rows.append(
            Row(
                f"finetune step, {size} px fp32 channels_last vs 224 px NCHW",
                steps_per_second(size, True, "fp32"),
                before,
                "img/s",
                note="--train-size",
            )
        )
    fp32 = statistics.median(steps_per_second(224, True, "fp32") for _ in range(2))
    bf16 = statistics.median(steps_per_second(224, True, "bf16") for _ in range(2))
    native = cpu_has_bf16()
    rows.append(
        Row(
            "finetune step, 224 px channels_last, bf16 autocast vs fp32 (same batch)",
            bf16,
            fp32,
            "img/s",
            note=f"{'native' if native else 'no native'} bf16 on this CPU; auto trains in bf16 on CPUs only from "
            f"{BF16_TRAINING_SPEEDUP}x: {'bf16' if native and bf16 / fp32 >= BF16_TRAINING_SPEEDUP else 'fp32'} here",
        )
    )
    return report("finetune" + ("-quick" if quick else ""), rows)


def bench_predictions(quick: bool) -> dict:
    """Predictions a user can act on, on dogscats and flowers5: familiarity against the other set's photos beside
    the top probability, and prediction sets' coverage on valid."""
    from bench.predictions import prediction_rows

    return report("predictions" + ("-quick" if quick else ""), prediction_rows(quick))


BENCHMARKS = {
    "featurize": bench_featurize,
    "ray": bench_ray,
    "heads": bench_heads,
    "stream": bench_stream,
    "scale": bench_scale,
    "labels": bench_labels,
    "rss": bench_rss,
    "accuracy": bench_accuracy,
    "export": bench_export,
    "checksums": bench_checksums,
    "audit": bench_audit,
    "predictions": bench_predictions,
    "finetune": bench_finetune,
    "gpu": bench_gpu,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small inputs, one pair: a smoke check in under 2 minutes")
    args = parser.parse_args()
    configure_process()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    for name in args.names or BENCHMARKS:
        BENCHMARKS[name](args.quick)


if __name__ == "__main__":
    main()
