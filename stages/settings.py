"""What a run is asked to do, typed: a head's shape (HeadSpec), the settings a head trains with (TrainConfig) and
those of a fine-tune (FinetuneConfig). A run's config.json holds them (stages/rundir.py), so they import no torch:
a run is read, listed and checked without it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from stages.errors import SEED_MAX, PipelineError, check_range

HEAD_KINDS = ("logreg", "linear", "mlp")  # logreg: L-BFGS to convergence (stages/linear_probe.py); the rest AdamW
SCHEDULES = ("onecycle", "cosine", "constant")
UNFREEZE = ("all", "late", "gradual")
PRECISIONS = ("auto", "fp32", "bf16")


def known_fields(cls: type, values: dict) -> dict:
    """The values of a dict that are fields of the dataclass `cls` (a config written by another version may hold
    more, or fewer)."""
    return {f.name: values[f.name] for f in fields(cls) if f.name in values}


@dataclass(frozen=True)
class HeadSpec:
    """A head's shape: what stages.head.Head is built from, and what a run's config records of it."""

    head: str  # one of HEAD_KINDS
    feature_dim: int
    num_classes: int
    hidden: int
    dropout: float
    task: str = "single"  # stages.tasks

    def to_json(self) -> dict:
        values = asdict(self)
        return values if self.task != "single" else {k: v for k, v in values.items() if k != "task"}

    @classmethod
    def from_json(cls, values: dict) -> HeadSpec:
        return cls(**known_fields(cls, values))


@dataclass
class TrainConfig:
    """Hyperparameters of one head run (logreg uses l2, folds and views; the AdamW heads the rest)."""

    head: str = "logreg"
    epochs: int = 3
    lr: float = 1e-2
    wd: float = 1e-4
    batch_size: int = 256
    schedule: str = "onecycle"
    seed: int = 0
    views: int = 0
    hidden: int = 512
    dropout: float = 0.5
    l2: float | None = None  # logreg's L2 strength; None: chosen by k-fold cross-validation on train
    calibrate: bool = True  # fit a temperature on out-of-fold logits of the training split
    folds: int = 5

    def validate(self, views_in_store: int) -> None:
        if self.head not in HEAD_KINDS:
            raise PipelineError(f"--head {self.head!r} is not one of {', '.join(HEAD_KINDS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineError(f"--lr {self.lr} is out of range; give a positive learning rate such as 1e-2")
        if self.wd < 0:
            raise PipelineError(f"--wd {self.wd} is out of range; give a weight decay >= 0")
        for option, value, low, high in (
            ("--epochs", self.epochs, 1, 100_000),
            ("--batch-size", self.batch_size, 1, 2**24),
            ("--seed", self.seed, 0, SEED_MAX),
            ("--hidden", self.hidden, 1, 2**16),
        ):
            check_range(option, value, low, high)
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"--dropout {self.dropout} is out of range; give a fraction in [0, 1)")
        if self.l2 is not None and not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise PipelineError(f"--l2 {self.l2} is out of range; give auto or a strength >= 0 such as 0.1")
        check_range("--folds", self.folds, 2, 100)
        if self.views < 0 or self.views > views_in_store:
            raise PipelineError(
                f"--views {self.views} is more than the store holds ({views_in_store} augmented "
                f"views per image); featurize with --views {self.views} or ask for fewer"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneConfig:
    """Hyperparameters of a fine-tuning run."""

    epochs: int = 4
    lr: float = 1e-3
    lr_mult: float = 10.0
    wd: float = 1e-4
    unfreeze: str = "all"
    train_bn: bool = False
    batch_size: int = 32
    seed: int = 0
    precision: str = "fp32"
    clip: float = 1.0
    label_smoothing: float = 0.1  # measured on flowers5: 81.5 % vs 79.8 %, worst mistake p 0.969 vs 0.9996
    crop_area: float = 0.8  # smallest area of a random-resized crop (measured on flowers5: 0.8 beat 0.5)
    train_size: int | None = None  # side of the training crops; None: the backbone's input size
    keep_best: bool = True  # end with the best epoch's weights by valid accuracy, the start included
    calibration_pct: float = 0.1  # train images left out of the head and of fine-tuning, for the temperature

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineError(f"--lr {self.lr} is out of range; give a positive learning rate such as 1e-3")
        if self.lr_mult < 1:
            raise PipelineError(f"--lr-mult {self.lr_mult} is out of range; give 1 or more (100 spreads rates 100x)")
        if self.unfreeze not in UNFREEZE:
            raise PipelineError(f"--unfreeze {self.unfreeze!r} is not one of {', '.join(UNFREEZE)}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.label_smoothing < 1:
            raise PipelineError(f"--label-smoothing {self.label_smoothing} is out of range; give a fraction in [0, 1)")
        if not 0 < self.crop_area <= 1:
            raise PipelineError(f"--crop-area {self.crop_area} is out of range; give a fraction in (0, 1]")
        if not 0 <= self.calibration_pct <= 0.5:
            raise PipelineError(
                f"--calibration-pct {self.calibration_pct} is out of range; give a fraction in [0, 0.5] (0 keeps "
                "the head's temperature)"
            )
        if self.train_size is not None:
            check_range("--train-size", self.train_size, 32, 1024)
        for option, value, low, high in (
            ("--epochs", self.epochs, 1, 10_000),
            ("--batch-size", self.batch_size, 1, 4096),
            ("--wd", self.wd, 0, None),
            ("--seed", self.seed, 0, SEED_MAX),
        ):
            check_range(option, value, low, high)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneSettings(FinetuneConfig):
    """A fine-tune as run: its settings, the kind of its head and the head run it started from."""

    head: str = "linear"
    from_head: str = ""
