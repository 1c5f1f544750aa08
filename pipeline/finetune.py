"""finetune: unfreeze the backbone under a trained head and train both on live-augmented images."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.distributed import current_shard
from pipeline.plots import plot_training_curves
from pipeline.runtime import available_memory, cpu_count, torch_threads
from pipeline.train_head import refit_head
from stages.backbones import file_sha256, resolve_precision
from stages.calibration import held_out_images
from stages.decode import batch_memory_bytes, resolve_device
from stages.errors import PipelineError, check_memory
from stages.files import scan_dataset
from stages.finetune import FinetuneConfig, Finetuner, Ranks, read_checkpoint
from stages.head import load_head
from stages.model import backbone_for
from stages.rundir import BACKBONE_WEIGHTS, HEAD_WEIGHTS, write_run, write_weights


def _split(dataset, name: str, keep=None) -> tuple[list[str], np.ndarray] | None:
    files = [f for i, f in enumerate(dataset.splits.get(name) or []) if keep is None or keep[i]]
    if not files:
        return None
    return [str(dataset.root / f.path) for f in files], np.asarray([f.label for f in files])


def finetune(
    data_dir: Path,
    head_dir: Path,
    out: Path,
    cfg: FinetuneConfig,
    resume: Path | None = None,
    device: str = "auto",
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Fine-tune from a train-head run (or continue a stopped fine-tune); write a run directory predict can use.
    threads: torch's threads while training (None: the cores, shared among this machine's ranks)."""
    state = None
    if resume is not None:
        state = read_checkpoint(resume)
        cfg, out = FinetuneConfig(**state["config"]), resume
    device = resolve_device(device)
    shard = current_shard(device=device)
    if shard.index != 0:  # one rank prints the table
        on_epoch = on_step = None
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, training=True))
    head, head_config = load_head(head_dir)
    backbone = backbone_for(head_config["feature_set"], head_dir)
    dataset = scan_dataset(data_dir)
    if dataset.classes != head_config["classes"]:
        raise PipelineError(
            f"classes of {data_dir} ({', '.join(dataset.classes)}) differ from those of {head_dir} "
            f"({', '.join(head_config['classes'])}); fine-tune on the data the head was trained for"
        )
    cfg.validate()
    train_files = dataset.splits.get("train") or []
    held = held_out_images(
        [f.path for f in train_files], np.asarray([f.label for f in train_files]), cfg.calibration_pct, cfg.seed
    )
    train, calibration = _split(dataset, "train", ~held), _split(dataset, "train", held)
    valid = _split(dataset, "valid")
    if train is None:
        raise PipelineError(f"{data_dir} has no train/ images to fine-tune on")
    refitted = None
    if calibration is not None and state is None:
        # The head saw every train image: fitted again without the held-out ones, they judge the temperature fairly.
        refitted = refit_head(head_dir, head_config, {f.path for f, h in zip(train_files, held) if h}, threads)
    check_memory(
        f"--batch-size {cfg.batch_size}",
        batch_memory_bytes(cfg.batch_size // shard.count, 1, backbone.preprocessing.size, training=True),
        available_memory(),
        f"training on {cfg.batch_size // shard.count} images per step",
    )
    tuner = Finetuner(backbone, head, cfg, device, out, Ranks(shard.index, shard.count))
    train_threads = threads or cpu_count() // shard.local_count
    steps_per_epoch = -(-len(train[0]) // cfg.batch_size)
    if state is not None:
        tuner.restore(state, steps_per_epoch)
    with torch_threads(train_threads):
        if state is None and valid:
            tuner.before = tuner.evaluate(*valid)
            if cfg.keep_best:  # the head as given, with its own cross-validated temperature
                tuner.remember_if_best(-1, tuner.before)
        if refitted is not None:
            tuner.model.head.load_state_dict(refitted.state_dict())
        started = time.perf_counter()
        tuner.fit(train, valid, on_epoch=on_epoch, on_step=on_step)
        seconds = time.perf_counter() - started
    kept = tuner.restore_best()
    if shard.index != 0:
        return {"run": str(out), "rank": shard.index, "quiet": True}
    temperature = None
    if calibration is not None and (kept is None or kept["epoch"] >= 0):
        with torch_threads(train_threads):
            temperature = tuner.calibrate(*calibration)
    write_weights(out, {BACKBONE_WEIGHTS: tuner.model.backbone.architecture_state_dict()})
    feature_set = {
        **head_config["feature_set"],
        "store": None,
        "set": None,
        "weights_sha256": file_sha256(out / BACKBONE_WEIGHTS),
        "weights_path": str((out / BACKBONE_WEIGHTS).resolve()),
    }
    config = {
        "kind": "finetune",
        "head": head_config["head"],
        "classes": head_config["classes"],
        "train": {**cfg.to_dict(), "head": head_config["head"]["head"], "from_head": str(head_dir)},
        "feature_set": feature_set,
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    last = kept or (tuner.history[-1] if tuner.history else {})
    images = len(train[0]) * (cfg.epochs - (state["epoch"] if state is not None else 0))
    metrics = {
        "history": tuner.history,
        "before": tuner.before,
        "kept_epoch": kept["epoch"] if kept else None,
        "temperature": float(tuner.model.head.temperature),
        "calibration_images": len(calibration[0]) if calibration and temperature is not None else 0,
        "accuracy": last.get("accuracy"),
        "valid_loss": last.get("valid_loss"),
        "train_seconds": seconds,
        "train_images_per_second": images / seconds if seconds else None,
    }
    write_run(
        out,
        {HEAD_WEIGHTS: tuner.model.head.state_dict()},
        config,
        metrics,
        lambda path: plot_training_curves(tuner.history, tuner.step_losses, path),
    )
    return {"run": str(out), "processes": shard.count, **metrics}
