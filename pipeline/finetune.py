"""finetune: unfreeze the backbone under a trained head and train both on live-augmented images.

prepare (the head, its backbone, the data and the held-out calibration images; the head refitted without them),
fit (the epochs, checkpointed), save (the run folder, published whole).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.distributed import current_ranks
from pipeline.lifecycle import nothing_written
from pipeline.plots import plot_training_curves
from pipeline.runtime import available_memory, cpu_count, torch_threads
from pipeline.train_head import refit_head
from stages.atomic import check_replaceable, locked_output, published_folder
from stages.backbones import Backbone, file_sha256, resolve_precision
from stages.calibration import held_out_images
from stages.decode import batch_memory_bytes, resolve_device
from stages.errors import PipelineError, check_memory
from stages.familiarity import Familiarity, load_familiarity
from stages.files import scan_dataset
from stages.finetune import Finetuner, read_checkpoint
from stages.head import Head, load_head
from stages.labels import recorded_options
from stages.model import backbone_for
from stages.ranks import Ranks
from stages.rundir import (
    BACKBONE_WEIGHTS,
    CHECKPOINT,
    FAMILIARITY,
    HEAD_WEIGHTS,
    RUN_MARKERS,
    RunConfig,
    TrainedOn,
    write_run,
    write_weights,
)
from stages.settings import FinetuneConfig, FinetuneSettings
from store import FeatureStore

Images = tuple[list[str], np.ndarray]  # file paths and their labels


@dataclass
class Prepared:
    """What a fine-tune trains from: the head and its backbone, the images of each use, and the head refitted
    without the calibration images (None when resuming or when none are held out)."""

    cfg: FinetuneConfig
    head: Head
    head_config: RunConfig
    backbone: Backbone
    train: Images
    valid: Images | None
    calibration: Images | None
    refitted: Head | None
    state: dict | None  # the checkpoint a resumed run continues from


def default_out(root: Path = Path("runs")) -> Path:
    return root / f"ft-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def kept_when_interrupted(run_dir: Path) -> str:
    """What a fine-tune stopped midway leaves: its last checkpoint, to continue from."""
    if (run_dir / CHECKPOINT).is_file():
        return f"the last checkpoint is in {run_dir}; continue with --resume {run_dir}"
    return nothing_written(run_dir)


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
    overwrite: bool = False,
) -> FinetuneResult | None:
    """Fine-tune from a train-head run (or continue a stopped fine-tune); write a run directory predict can use.
    threads: torch's threads while training (None: the cores, shared among this machine's ranks).

    The run folder is held (locked) from the start; while training it holds only the checkpoint, and at the end
    the whole run takes its place in one step. An existing run there is replaced only with overwrite, and stays
    usable until the new one is done. Under torchrun, ranks other than 0 return None."""
    out = Path(resume if resume is not None else out)
    device = resolve_device(device)
    ranks = current_ranks(device=device)
    if not ranks.leader:  # one rank prints the table and writes the run
        return _finetune(data_dir, head_dir, out, cfg, resume, device, ranks, None, None, threads)
    with locked_output(out):
        if resume is None:
            check_replaceable(out, RUN_MARKERS, "a run (continue an unfinished one with --resume)", overwrite)
        return _finetune(data_dir, head_dir, out, cfg, resume, device, ranks, on_epoch, on_step, threads)


@dataclass
class FinetuneResult:
    """A finished fine-tune: the run's folder and processes, and its metrics (what metrics.json holds): the epochs'
    history, valid before and after (the kept epoch's; -1: the head as given), the temperature and the speed."""

    run: str
    processes: int
    history: list[dict]
    before: dict | None
    kept_epoch: int | None
    temperature: float | list[float]  # one per class for a multi-label head
    calibration_images: int
    accuracy: float | None
    valid_loss: float | None
    train_seconds: float
    train_images_per_second: float | None
    precision: str  # trained, validated and served in
    task: str = "single"  # stages.tasks
    score: float | None = None  # the task's valid figure (accuracy, mAP, R^2) of the kept epoch

    def metrics(self) -> dict:
        """What the run folder's metrics.json holds."""
        return {k: v for k, v in asdict(self).items() if k not in ("run", "processes")}

    def to_json(self) -> dict:
        return asdict(self)


def _finetune(
    data_dir, head_dir, out, cfg, resume, device, ranks: Ranks, on_epoch, on_step, threads
) -> FinetuneResult | None:
    run = prepare(data_dir, head_dir, cfg, resume, device, ranks, threads)
    tuner = Finetuner(run.backbone, run.head, run.cfg, device, out, ranks)
    train_threads = threads or cpu_count() // ranks.local_world
    with torch_threads(train_threads):
        seconds, kept = fit(tuner, run, on_epoch, on_step)
    if not ranks.leader:  # rank 0 writes the run and reports it
        return None
    temperature, familiarity = None, None
    if kept is not None and kept["epoch"] < 0:  # the head as given was kept: its temperature and its familiarity
        familiarity = load_familiarity(head_dir)
    elif run.calibration is not None:
        with torch_threads(train_threads):
            temperature, familiarity = tuner.calibrate(*run.calibration, train_files=run.train[0])
    return save(out, ranks, tuner, run, head_dir, kept, temperature, seconds, familiarity)


def _images(dataset, name: str, keep=None) -> Images | None:
    """A split's image files (absolute: a file's path is the key of its augmentation draw, which must not depend on
    how the data folder was spelled on the command line) and their targets: class indices, or (several labels,
    numbers: their table's) 0/1 rows of classes or values."""
    files = [f for i, f in enumerate(dataset.splits.get(name) or []) if keep is None or keep[i]]
    if not files:
        return None
    source = dataset.label_source
    if source is not None and source.task != "single":
        targets = source.targets([f.path for f in files])
    else:
        targets = np.asarray([f.label for f in files])
    root = dataset.root.resolve()
    return [str(root / f.path) for f in files], targets


def _recorded_split(config: RunConfig) -> tuple[float | None, int]:
    """The --valid-pct and seed the head's store split its data folder with (None, 0: its folders did, or the
    store is gone)."""
    store = config.feature_set.store
    if not store or not Path(store).is_file():
        return None, 0
    with FeatureStore(Path(store)) as opened:
        record = opened.feature_set(config.feature_set.set).record
    return record.valid_pct, record.split_seed


def prepare(
    data_dir: Path,
    head_dir: Path,
    cfg: FinetuneConfig,
    resume: Path | None,
    device: str,
    ranks: Ranks,
    threads: int | None,
) -> Prepared:
    """The head, its backbone and the images, checked; the calibration images held out and the head refitted
    without them (a named step: the head saw every train image, so only a head fitted without them lets those
    images judge the temperature fairly)."""
    state = None
    if resume is not None:
        state = read_checkpoint(resume)
        cfg = FinetuneConfig(**state["config"])
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, training=True))
    head, head_config = load_head(head_dir)
    backbone = backbone_for(head_config.feature_set, head_dir)
    valid_pct, split_seed = _recorded_split(head_config)
    # labelled and split as the head's store was
    dataset = scan_dataset(data_dir, valid_pct, split_seed, labels=recorded_options(head_config.labels))
    if dataset.classes != head_config.classes:
        raise PipelineError(
            f"classes of {data_dir} ({', '.join(dataset.classes)}) differ from those of {head_dir} "
            f"({', '.join(head_config.classes)}); fine-tune on the data the head was trained for"
        )
    cfg.validate()
    if head.task.name != "single" and ranks.world > 1:
        raise PipelineError(
            f"{head_dir} is a {head.task.name} head: fine-tune it in one process (without torchrun) in this release"
        )
    train_files = dataset.splits.get("train") or []
    held = held_out_images(
        [f.path for f in train_files], np.asarray([f.label for f in train_files]), cfg.calibration_pct, cfg.seed
    )
    train = _images(dataset, "train", ~held)
    if train is None:
        raise PipelineError(f"{data_dir} has no train/ images to fine-tune on")
    calibration = _images(dataset, "train", held)
    refitted = None
    if calibration is not None and state is None:
        refitted = refit_head(head_dir, head_config, {f.path for f, h in zip(train_files, held) if h}, threads)
    check_memory(
        f"--batch-size {cfg.batch_size}",
        batch_memory_bytes(cfg.batch_size // ranks.world, 1, backbone.preprocessing.size, training=True),
        available_memory(),
        f"training on {cfg.batch_size // ranks.world} images per step",
    )
    return Prepared(cfg, head, head_config, backbone, train, _images(dataset, "valid"), calibration, refitted, state)


def fit(
    tuner: Finetuner,
    run: Prepared,
    on_epoch: Callable[[dict], None] | None,
    on_step: Callable[[int, int], None] | None,
) -> tuple[float, dict | None]:
    """The epochs from the start (the head as given scored first, the starting candidate of keep-best) or from the
    checkpoint; returns the seconds trained and the kept epoch's metrics (None without keep-best)."""
    if run.state is not None:
        tuner.restore(run.state, -(-len(run.train[0]) // run.cfg.batch_size))
    else:
        if run.valid:
            tuner.before = tuner.evaluate(*run.valid)
            if run.cfg.keep_best:  # the head as given, with its own cross-validated temperature
                tuner.remember_if_best(-1, tuner.before)
        if run.refitted is not None:
            tuner.model.head.load_state_dict(run.refitted.state_dict())
    started = time.perf_counter()
    tuner.fit(run.train, run.valid, on_epoch=on_epoch, on_step=on_step)
    return time.perf_counter() - started, tuner.restore_best()


def save(
    out: Path,
    ranks: Ranks,
    tuner: Finetuner,
    run: Prepared,
    head_dir: Path,
    kept: dict | None,
    temperature: float | None,
    seconds: float,
    familiarity: Familiarity | None = None,
) -> FinetuneResult:
    """Write the run (mirroring train-head's save_head_run) into a staging folder that then replaces `out`, which
    held only the checkpoint."""
    last = kept or (tuner.history[-1] if tuner.history else {})
    images = len(run.train[0]) * (run.cfg.epochs - (run.state["epoch"] if run.state is not None else 0))
    result = FinetuneResult(
        run=str(out),
        processes=ranks.world,
        history=tuner.history,
        before=tuner.before,
        kept_epoch=kept["epoch"] if kept else None,
        temperature=tuner.model.head.temperature.tolist(),
        calibration_images=len(run.calibration[0]) if run.calibration and temperature is not None else 0,
        accuracy=last.get("accuracy"),
        valid_loss=last.get("valid_loss"),
        task=tuner.model.head.task.name,
        score=last.get(tuner.model.head.task.primary),
        train_seconds=seconds,
        train_images_per_second=images / seconds if seconds else None,
        precision=run.cfg.precision,
    )
    with published_folder(out) as staging:
        write_weights(staging, {BACKBONE_WEIGHTS: tuner.model.backbone.architecture_state_dict()})
        head = run.head_config
        config = RunConfig(  # the head's, trained on features of the fine-tuned weights (never stored)
            kind="finetune",
            head=head.head,
            classes=head.classes,
            train=FinetuneSettings(**run.cfg.to_dict(), head=head.head.head, from_head=str(head_dir)),
            feature_set=TrainedOn(
                head.feature_set.identity.with_weights(file_sha256(staging / BACKBONE_WEIGHTS)),
                weights_path=str((out / BACKBONE_WEIGHTS).resolve()),
            ),
            created=datetime.now().isoformat(timespec="seconds"),
            precision=run.cfg.precision,  # validated and kept in it: served in it
            labels=head.labels,
        )
        weights = {HEAD_WEIGHTS: tuner.model.head.state_dict()}
        metrics = result.metrics()
        if familiarity is not None:  # from the fine-tuned backbone's own features (stages.familiarity)
            weights[FAMILIARITY] = familiarity.state_dict()
            metrics["familiarity"] = familiarity.summary()
        write_run(
            staging,
            weights,
            config,
            metrics,
            lambda path: plot_training_curves(tuner.history, tuner.step_losses, path),
        )
        os.link(out / CHECKPOINT, staging / CHECKPOINT)  # the last checkpoint stays with the run
    return result
