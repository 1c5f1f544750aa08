"""train-head, lr-find and runs: head experiments on a feature store's cached features."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from pipeline.plots import plot_cv_path, plot_lr_find, plot_training_curves
from pipeline.runtime import cpu_count, torch_threads
from stages.atomic import check_replaceable, locked_output, output_folder, published_folder
from stages.calibration import image_folds
from stages.errors import PipelineError, check_range
from stages.familiarity import PASS_SHARE, Familiarity, fit_familiarity
from stages.head import (
    Head,
    LrFindResult,
    Rows,
    evaluate_head,
    fits_in_memory,
    lr_find,
    out_of_fold_logits,
    parse_size,
    raw_outputs,
    select_rows,
    settle,
    stream_block_rows,
    train_heads,
)
from stages.labels import LabelOptions, recorded_options
from stages.linear_probe import fold_count, train_logreg
from stages.rundir import (
    FAMILIARITY,
    HEAD_WEIGHTS,
    RUN_MARKERS,
    RunConfig,
    RunSummary,
    TrainedOn,
    check_compatible,
    rank_runs,
    write_run,
)
from stages.settings import TrainConfig
from stages.tasks import TASKS, Task
from store import FeatureSet, FeatureStore

LR_FIND_PNG = "lr_find.png"


@dataclass
class CachedFeatures:
    """A feature set's train and valid splits, loaded once and shared by every run of a grid."""

    store: Path
    feature_set: FeatureSet
    train: Rows
    valid: Rows | None
    views_in_store: int
    memory_limit: int
    excluded: frozenset[str] = frozenset()  # train images (paths in the store) no head is fitted on
    labels: dict | None = None  # which labelling the heads learn: label_source, label_origin, label_digest
    familiar_share: float = PASS_SHARE  # of held-out training images, the share the familiarity threshold passes

    @property
    def classes(self) -> list[str]:
        return self.feature_set.classes

    @property
    def task(self) -> Task:
        return TASKS[self.feature_set.task]

    @cached_property
    def familiarity(self) -> Familiarity:
        """How like the training images an image is (stages.familiarity): from the plain views heads are fitted on,
        shared by every run of a grid."""
        return fit_familiarity(self.train_rows(0), pass_share=self.familiar_share)

    def excluding(self, paths: set[str]) -> CachedFeatures:
        """The same features with these train images left out of every fit."""
        return replace(self, excluded=self.excluded | frozenset(paths))

    def train_rows(self, views: int) -> Rows:
        rows = select_rows(self.feature_set.column("train", "view"), views)
        if self.excluded:
            paths = self.feature_set.column("train", "paths")
            rows = rows[[paths[r] not in self.excluded for r in rows]]
        return self.train.select(rows)

    def folds(self, rows: Rows, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Per selected train row: its cross-validation fold (by image, stratified) and whether it is a plain view;
        and whether fold 0 is a held-out share rather than one of k folds (rows are plenty: fold_count)."""
        paths = self.feature_set.column("train", "paths")
        plain = self.feature_set.column("train", "view")[rows.rows] == 0
        count, held_out = fold_count(int(plain.sum()), k)
        strata = self.task.strata(rows.labels[rows.rows].numpy())
        return image_folds([paths[r] for r in rows.rows], strata, count, seed), plain, held_out


def load_cached_features(
    store: FeatureStore,
    set_name: str | None = None,
    max_memory: str = "4G",
    labels: LabelOptions | None = None,
    familiar_share: float = PASS_SHARE,
) -> CachedFeatures:
    """Open the train (all views) and valid (view 0) splits; in memory when they fit under max_memory. With
    `labels`, under another labelling of the same images (no featurize): a table or a pattern over stored paths.
    `familiar_share`: of held-out training images, the share the runs' familiarity threshold lets pass."""
    check_range("--familiar-share", familiar_share, 0.5, 0.999)
    feature_set = store.feature_set(set_name)
    if "train" not in feature_set.splits:
        raise PipelineError(
            f"store {store.path} set {feature_set.name} has no train split; featurize a folder with train/"
        )
    feature_set = feature_set.with_labels(labels)
    limit = parse_size(max_memory)
    views = feature_set.column("train", "view")
    if not len(views):
        raise PipelineError(
            f"store {store.path} set {feature_set.name} has no train rows; add images under train/ and featurize again"
        )
    features = feature_set.features("train")
    block = stream_block_rows(limit, features.shape[1])
    train = feature_set.rows("train", np.arange(len(views)), fits_in_memory(features, limit), block)
    valid = None
    if "valid" in feature_set.splits and len(feature_set.column("valid", "labels")):  # an empty valid/ is no valid
        plain = select_rows(feature_set.column("valid", "view"), 0)
        valid = feature_set.rows("valid", plain, fits_in_memory(feature_set.features("valid"), limit), block)
    views_in_store = feature_set.identity.views
    return CachedFeatures(
        store.path,
        feature_set,
        train,
        valid,
        views_in_store,
        limit,
        labels=feature_set.labelling,
        familiar_share=familiar_share,
    )


def save_head_run(
    out: Path,
    head: Head,
    cfg: TrainConfig,
    history: list[dict],
    step_losses: list[float],
    valid: dict | None,
    cached: CachedFeatures,
    seconds: float,
) -> dict:
    """Write the head's run directory (stages.rundir); return the metrics."""
    features = cached.feature_set
    config = RunConfig(
        kind="head",
        head=head.spec(),
        classes=cached.classes,
        labels=cached.labels,
        train=cfg,
        feature_set=TrainedOn(
            features.identity, str(cached.store.resolve()), features.name, features.record.weights_path
        ),
        created=datetime.now().isoformat(timespec="seconds"),
        precision=features.identity.precision,
    )
    metrics = {
        "history": history,
        "train_seconds": seconds,
        "temperature": head.temperature.tolist(),
        "accuracy": valid.get("accuracy") if valid else None,
        "valid_loss": valid["loss"] if valid else None,
        "valid_ece": valid.get("ece") if valid else None,
        "per_class_accuracy": {cached.classes[c]: a for c, a in valid["per_class_accuracy"].items()}
        if valid and "per_class_accuracy" in valid
        else {},
    }
    metrics["task"], metrics["score"] = cached.task.name, valid[cached.task.primary] if valid else None
    if cached.task.name != "single":  # its own figures on valid (stages.tasks), and what it decides with
        metrics["valid"] = _named(valid, cached.classes) if valid else None
        if cached.task.name == "multi":
            metrics["thresholds"] = dict(zip(cached.classes, head.thresholds.tolist()))

    def plot(path: Path) -> None:
        if cfg.head == "logreg":
            plot_cv_path(history, cfg.l2, path)
        else:
            plot_training_curves(history, step_losses, path)

    metrics["familiarity"] = cached.familiarity.summary()
    weights = {HEAD_WEIGHTS: head.state_dict(), FAMILIARITY: cached.familiarity.state_dict()}
    write_run(out, weights, config, metrics, plot)
    return metrics


def _named(figures: dict, classes: list[str]) -> dict:
    """A task's figures with per-class entries keyed by class name."""
    return {
        k: {classes[c]: v for c, v in value.items()} if k.startswith("per_class") else value
        for k, value in figures.items()
    }


def grid_from_options(
    base: TrainConfig, head: str, lr: str, wd: str, epochs: str, views: str, l2: str
) -> tuple[list[TrainConfig], bool]:
    """train-head's options as typed (comma lists such as 'logreg,linear' or '1e-3,1e-2'; 'auto' for --lr and --l2):
    every run of the grid, and whether --lr auto asks for lr-find's suggestion (each AdamW run's rate, found later)."""
    auto = lr.strip() == "auto"
    configs = expand_grid(
        split_list("--head", head, str),
        [1.0] if auto else split_list("--lr", lr, float),
        split_list("--wd", wd, float),
        split_list("--epochs", epochs, int),
        split_list("--views", views, int),
        base,
        [None] if l2.strip() == "auto" else split_list("--l2", l2, float),
    )
    return configs, auto


def split_list(option: str, text: str, convert) -> list:
    """'1e-3,1e-2' -> [0.001, 0.01]; a clear error names the option."""
    try:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"{option} {text!r} is not a comma-separated list of {convert.__name__} values") from None
    if not values:
        raise PipelineError(f"{option} is empty; give at least one value")
    return values


def expand_grid(
    heads: list[str],
    lrs: list,
    wds: list[float],
    epochs: list[int],
    views: list[int],
    base: TrainConfig,
    l2s: list[float | None] = (None,),
) -> list[TrainConfig]:
    """Every combination of the listed values that makes a different run, in a stable order.

    logreg takes no lr, wd or epochs, and the AdamW heads no l2: each head is crossed only with its own options.
    """
    configs, seen = [], set()
    for h, lr, wd, e, v, l2 in itertools.product(heads, lrs, wds, epochs, views, l2s):
        cfg = replace(base, head=h, lr=lr, wd=wd, epochs=e, views=v, l2=l2 if h == "logreg" else None)
        if run_name(cfg) not in seen:
            seen.add(run_name(cfg))
            configs.append(cfg)
    return configs


def run_name(cfg: TrainConfig) -> str:
    if cfg.head == "logreg":
        return f"logreg-l2{'auto' if cfg.l2 is None else f'{cfg.l2:g}'}-v{cfg.views}"
    return f"{cfg.head}-lr{cfg.lr:g}-wd{cfg.wd:g}-e{cfg.epochs}-v{cfg.views}"


def default_out(root: Path = Path("runs")) -> Path:
    return root / f"head-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def head_threads(threads: int | None) -> int:
    """Heads are small: a few threads are as fast as many and leave cores for the rest of the machine."""
    return threads or min(4, cpu_count())


def find_lr(
    cached: CachedFeatures, cfg: TrainConfig, out: Path | None = None, threads: int | None = None, **sweep
) -> LrFindResult:
    """lr-find on cached features; writes lr_find.png into out when given."""
    cfg.validate(cached.views_in_store)
    if cfg.head == "logreg":
        raise PipelineError("logreg is fitted by L-BFGS and takes no learning rate; lr-find a linear or mlp head")
    if out is None:
        return _sweep(cached, cfg, threads, sweep)
    with output_folder(out, (LR_FIND_PNG,), "an lr-find plot") as staging:  # held from the start
        result = _sweep(cached, cfg, threads, sweep)
        plot_lr_find(result, staging / LR_FIND_PNG)
    return replace(result, plot=str(out / LR_FIND_PNG))


def _sweep(cached: CachedFeatures, cfg: TrainConfig, threads: int | None, sweep: dict) -> LrFindResult:
    rows = cached.train_rows(cfg.views)
    folds, plain, _ = cached.folds(rows, cfg.folds, cfg.seed)
    rows, _, _ = _task_rows(cached, rows, None)  # numbers regressed standardized, as fit_head does
    with torch_threads(head_threads(threads)):
        return lr_find(rows, folds, plain, cfg, len(cached.classes), **sweep, task=cached.task)


def fit_head(
    cached: CachedFeatures,
    cfg: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
    on_strength: Callable[[dict], None] | None = None,
) -> tuple[Head, TrainConfig, list[dict], list[float]]:
    """One head on the cached train split, calibrated on out-of-fold logits of train (never valid) unless told not.

    Returns the head, the config as run (logreg's chosen l2 filled in), its history (epochs, or logreg's
    cross-validation path) and per-step losses.
    """
    return fit_heads(cached, [cfg], on_epoch, on_strength)[0]


def fit_heads(
    cached: CachedFeatures,
    cfgs: list[TrainConfig],
    on_epoch: Callable[[dict], None] | None = None,
    on_strength: Callable[[dict], None] | None = None,
) -> list[tuple[Head, TrainConfig, list[dict], list[float]]]:
    """fit_head for configs that share their rows and batches (one logreg config, or AdamW configs of one
    shared_batches key), the AdamW heads trained together (stages.head.train_heads); per config as fit_head."""
    cfg = cfgs[0]
    rows = cached.train_rows(cfg.views)
    folds, plain, held_out = cached.folds(rows, cfg.folds, cfg.seed)
    num_classes, task = len(cached.classes), cached.task
    rows, valid, scale = _task_rows(cached, rows, cached.valid)
    if cfg.head == "logreg":
        # float32 rows held during cross-validation: the sample, and each fold's training copy with its transpose.
        cv_max_rows = max(1000, cached.memory_limit // (4 * (1 + 2 * cfg.folds) * rows.dim))
        head, fit = train_logreg(
            rows, folds, plain, num_classes, cfg.l2, cfg.calibrate, cfg.seed, cv_max_rows, on_strength, task, held_out
        )
        fitted = [(head, replace(cfg, l2=fit["l2"]), fit["path"], [])]
    else:
        # Where rows are plenty the heads train on all but the held-out share and calibrate on it: one training,
        # not k + 1.
        trained = train_heads(
            rows.select(rows.rows[folds != 0]) if held_out else rows, valid, cfgs, num_classes, on_epoch, task
        )
        if cfg.calibrate:
            held = rows.select(rows.rows[(folds == 0) & plain])
            outputs = (
                [raw_outputs(head, held) for head, _, _ in trained]
                if held_out
                else out_of_fold_logits(rows, folds, plain, cfgs, num_classes, task)
            )
            for (head, _, _), (raw, truth) in zip(trained, outputs):
                settle(head, raw, truth)
        fitted = [(head, c, history, steps) for (head, history, steps), c in zip(trained, cfgs)]
    if scale is not None:
        with torch.no_grad():
            for head, *_ in fitted:
                last = head.last_layer()
                last.weight.mul_(scale[1])
                last.bias.mul_(scale[1]).add_(scale[0])
    return fitted


def shared_batches(cfg: TrainConfig) -> tuple:
    """What configs must share to train together: their rows (views), folds, calibration and batch order (seed,
    batch size); logreg configs, fitted by L-BFGS, each train alone."""
    if cfg.head == "logreg":
        return ("logreg", run_name(cfg))
    return ("adamw", cfg.views, cfg.folds, cfg.calibrate, cfg.seed, cfg.batch_size)


def _task_rows(cached: CachedFeatures, rows: Rows, valid: Rows | None) -> tuple[Rows, Rows | None, tuple | None]:
    """The rows a head fits: numeric targets standardized on train (one lr and one L2 path suit any unit; the
    head's last layer is rescaled after, by the (mean, std) returned), other targets as they are."""
    if cached.task.name != "numeric":
        return rows, valid, None
    values = rows.labels[rows.rows]
    scale = (values.mean(), values.std().clamp_min(1e-12))
    return _standardized(rows, *scale), _standardized(valid, *scale) if valid is not None else None, scale


def _standardized(rows: Rows, mean: torch.Tensor, std: torch.Tensor) -> Rows:
    """The same rows with their numeric targets standardized."""
    other = rows.select(rows.rows)
    other.labels = (rows.labels - mean) / std
    return other


def refit_head(run_dir: Path, config: RunConfig, exclude: set[str], threads: int | None = None) -> Head:
    """A train-head run's head fitted again on its store with its recorded settings (logreg: its chosen l2),
    leaving out the train images `exclude` (paths as in the store); uncalibrated, for the caller to calibrate on
    what it left out."""
    store = config.feature_set.store
    if not store or not Path(store).is_file():
        raise PipelineError(
            f"{run_dir} was not trained on a feature store that is still here ({store}): it is "
            "needed to fit the head again without the calibration images; restore it, or pass --calibration-pct 0 "
            "to keep the head's temperature"
        )
    cfg = replace(config.train, calibrate=False)
    with FeatureStore(Path(store)) as opened:
        cached = load_cached_features(opened, config.feature_set.set, labels=recorded_options(config.labels))
        check_compatible(config, cached.feature_set.identity, cached.feature_set.name, run_dir)
        with torch_threads(head_threads(threads)):
            head, *_ = fit_head(cached.excluding(exclude), cfg)
    return head


def train_grid(
    cached: CachedFeatures,
    configs: list[TrainConfig],
    out: Path,
    auto_lr: bool = False,
    overwrite: bool = False,
    on_run: Callable[[int, TrainConfig], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_strength: Callable[[dict], None] | None = None,
    threads: int | None = None,
) -> list[HeadRun]:
    """Train every config on the same loaded features; return the leaderboard (best valid accuracy first)."""
    with torch_threads(head_threads(threads)):
        return _train_grid(cached, configs, out, auto_lr, overwrite, on_run, on_epoch, on_strength)


def _train_grid(cached, configs, out, auto_lr, overwrite, on_run, on_epoch, on_strength) -> list[HeadRun]:
    for cfg in configs:
        cfg.validate(cached.views_in_store)
    with locked_output(out):  # one writer of --out at a time, from the start
        for run_dir in [out] if len(configs) == 1 else [out / run_name(c) for c in configs]:
            check_replaceable(run_dir, RUN_MARKERS, "a run", overwrite)
        return _train_runs(cached, configs, out, auto_lr, on_run, on_epoch, on_strength)


@dataclass
class HeadRun(RunSummary):
    """One run of train-head: its leaderboard row, with logreg's chosen L2, the temperature (one per class for a
    multi-label head), the seconds, and its task with its primary figure on valid (stages.tasks: accuracy, mAP or
    R^2)."""

    temperature: float | list[float]
    seconds: float
    task: str = "single"
    score: float | None = None


def _train_runs(cached, configs, out, auto_lr, on_run, on_epoch, on_strength) -> list[HeadRun]:
    if auto_lr:
        configs = [c if c.head == "logreg" else replace(c, lr=find_lr(cached, c).suggestion) for c in configs]
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(shared_batches(cfg), []).append(i)
    board = []
    for members in groups.values():
        alone = len(members) == 1
        if alone and on_run:  # its tables print as it trains
            on_run(members[0], configs[members[0]])
        started = time.perf_counter()
        fitted = fit_heads(cached, [configs[i] for i in members], on_epoch if alone else None, on_strength)
        seconds = (time.perf_counter() - started) / len(members)  # each run's share of the training together
        for i, (head, cfg, history, steps) in zip(members, fitted):
            if not alone and on_run:  # trained together: each run's table after
                on_run(i, cfg)
                for row in history if on_epoch else ():
                    on_epoch(row)
            board.append(
                _save_run(cached, out if len(configs) == 1 else out / run_name(cfg), head, cfg, history, steps, seconds)
            )
    return rank_runs(board)


def _save_run(cached, run_dir, head, cfg, history, steps, seconds) -> HeadRun:
    """Evaluate a trained head on valid, write its run directory whole, and return its leaderboard row."""
    valid = evaluate_head(head, cached.valid) if cached.valid is not None else None
    check_finite(run_name(cfg), head, history, valid)
    score = valid[cached.task.primary] if valid else None
    with published_folder(run_dir) as staging:  # each run appears whole, or not at all
        metrics = save_head_run(staging, head, cfg, history, steps, valid, cached, seconds)
    adamw = cfg.head != "logreg"  # logreg takes no lr, wd or epochs
    return HeadRun(
        run=str(run_dir),
        head=cfg.head,
        lr=cfg.lr if adamw else None,
        wd=cfg.wd if adamw else None,
        epochs=cfg.epochs if adamw else None,
        views=cfg.views,
        l2=cfg.l2,
        accuracy=metrics["accuracy"],
        valid_loss=metrics["valid_loss"],
        temperature=metrics["temperature"],
        seconds=round(seconds, 3),
        task=cached.task.name,
        score=score,
    )


def check_finite(name: str, head: Head, history: list[dict], valid: dict | None) -> None:
    """A run whose weights, losses or valid metrics are NaN or infinite ends the command before anything is saved."""
    last = history[-1] if history else {}
    primary = head.task.primary
    numbers = {
        "train loss": last.get("train_loss", last.get("cv_loss", 0.0)),
        "valid loss": valid["loss"] if valid else 0.0,
        f"valid {primary}": valid[primary] if valid else 0.0,
    }
    bad = [k for k, v in numbers.items() if v is not None and not math.isfinite(v)]
    if not all(torch.isfinite(p).all() for p in head.classifier.parameters()):
        bad.insert(0, "weights")
    if bad:
        raise PipelineError(
            f"run {name} ended with non-finite {', '.join(bad)}: lower --lr (or check the store with "
            "pipeline store info --verify); nothing was saved for it"
        )
