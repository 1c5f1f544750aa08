"""The GPU check, ready for a machine with a CUDA GPU (python -m bench gpu), in under 5 minutes:

- featurize dogscats with --device cuda (DALI "mixed" decode, CUDA forward) and on the CPU: per-image cosine of
  the two feature sets (target >= 0.999) and both img/s;
- one fine-tuning epoch on the GPU (img/s);
- with two GPUs visible, a 2-process torchrun featurize (NCCL) that must store what one process stores.

Without a GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import REPO, SHARED, Row, pipeline_cmd, report, run_json_command, torchrun_cmd


def features_by_path(store: Path) -> dict[str, np.ndarray]:
    """Every stored plain view (view 0) of a store's only feature set, by file path."""
    import h5py

    with h5py.File(store, "r") as f:
        (name,) = list(f["sets"])
        found = {}
        for split in f["sets"][name]:
            group = f["sets"][name][split]
            if "features" not in group:
                continue
            plain = group["view"][()] == 0
            for path, row in zip(group["paths"][()][plain], group["features"][()][plain]):
                found[path.decode()] = row.astype(np.float32)
        return found


def data_folder(tmp: Path, quick: bool) -> tuple[Path, str]:
    source = SHARED / "dogscats"
    if source.is_dir():
        return source, "dogscats (2998 photos)"
    from pipeline.demo import make_demo_images

    return make_demo_images(
        tmp / "data", {"train": 60 if quick else 400, "valid": 20 if quick else 100}
    ), "generated images (../shared/data absent)"


def bench_gpu(quick: bool) -> dict | None:
    """The figures above, or one line when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        print("bench gpu: no CUDA GPU visible here; nothing to measure (run it on a machine with one)")
        return None
    gpus = torch.cuda.device_count()
    tmp = Path(tempfile.mkdtemp())
    data, label = data_folder(tmp, quick)
    gpu, gpu_wall = run_json_command(
        pipeline_cmd("featurize", data, "--store", tmp / "gpu.h5", "--device", "cuda", "--batch-size", "128")
    )
    # The cosine compares like with like: fp32 on both devices (the default is bf16 on a GPU).
    gpu32, _ = run_json_command(
        pipeline_cmd(
            "featurize",
            data,
            "--store",
            tmp / "gpu32.h5",
            "--device",
            "cuda",
            "--batch-size",
            "128",
            "--precision",
            "fp32",
        )
    )
    cpu, cpu_wall = run_json_command(
        pipeline_cmd("featurize", data, "--store", tmp / "cpu.h5", "--device", "cpu", "--precision", "fp32")
    )
    on_gpu, on_cpu = features_by_path(tmp / "gpu32.h5"), features_by_path(tmp / "cpu.h5")
    common = sorted(set(on_gpu) & set(on_cpu))
    a, b = np.stack([on_gpu[p] for p in common]), np.stack([on_cpu[p] for p in common])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rows = [
        Row(
            f"featurize --device cuda vs --device cpu, {label}",
            gpu["images_per_second"],
            cpu["images_per_second"],
            "img/s",
            note=f"wall {gpu_wall:.0f} s vs {cpu_wall:.0f} s; "
            f"{gpu['precision']} vs {cpu['precision']}; GPU fp32 {gpu32['images_per_second']} img/s",
        ),
        Row(
            "per-image cosine, GPU fp32 features to CPU fp32 features (minimum)",
            float(cosine.min()),
            None,
            "",
            note=f"{len(common)} images, median {np.median(cosine):.5f}; target >= 0.999",
        ),
    ]

    head, _ = run_json_command(pipeline_cmd("train-head", "--store", tmp / "gpu.h5", "--out", tmp / "head"))
    started = time.perf_counter()
    tuned, _ = run_json_command(
        pipeline_cmd(
            "finetune",
            data,
            "--head",
            tmp / "head",
            "--out",
            tmp / "ft",
            "--epochs",
            "1",
            "--device",
            "cuda",
            "--batch-size",
            "64",
        )
    )
    rows.append(
        Row(
            "finetune, one epoch on the GPU",
            tuned["train_images_per_second"],
            None,
            "img/s",
            note=f"valid {tuned['before']['accuracy']:.4f} -> {tuned['accuracy']:.4f}; "
            f"{time.perf_counter() - started:.0f} s wall",
        )
    )

    if gpus >= 2:
        command = torchrun_cmd(2, "featurize", data, "--store", tmp / "ddp.h5", "--device", "cuda", "--batch-size", 128)
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun featurize failed:\n{proc.stderr[-2000:]}")
        two, one = features_by_path(tmp / "ddp.h5"), features_by_path(tmp / "gpu.h5")
        same = set(two) == set(one) and all(np.allclose(two[p], one[p], atol=2e-2) for p in one)
        rows.append(
            Row(
                "torchrun featurize, 2 GPUs (NCCL), wall vs 1 GPU",
                wall,
                gpu_wall,
                "s",
                higher_is_better=False,
                note=f"same rows as one process: {same}",
            )
        )
    else:
        rows.append(Row("torchrun featurize, 2 GPUs (NCCL)", None, None, "", note=f"{gpus} GPU visible: not run"))
    shutil.rmtree(tmp)
    return report("gpu" + ("-quick" if quick else ""), rows, {"accuracy_head": head[0]["accuracy"]})
