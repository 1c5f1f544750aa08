"""Heads on cached features: the modules, the batch order (in memory or streamed from HDF5), training and lr-find."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import PipelineError

SCHEDULES = ("onecycle", "cosine", "constant")
HEAD_FILE = "head.safetensors"


class Standardize(nn.Module):
    """Feature standardization learned on the training features and saved with the head."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _linear(dim: int, classes: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Linear(dim, classes)


def _mlp(dim: int, classes: int, hidden: int, dropout: float) -> nn.Module:
    # fast.ai's head: batch norm and dropout around one hidden layer.
    return nn.Sequential(nn.Dropout(dropout / 2), nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                         nn.BatchNorm1d(hidden), nn.Dropout(dropout), nn.Linear(hidden, classes))


HEADS: dict[str, Callable[[int, int, int, float], nn.Module]] = {"linear": _linear, "mlp": _mlp}


class Head(nn.Module):
    """Standardize, then a linear or MLP classifier: features (N,D) -> logits (N,C)."""

    def __init__(self, kind: str, feature_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.5,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        if kind not in HEADS:
            raise PipelineError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        self.kind, self.feature_dim, self.num_classes = kind, feature_dim, num_classes
        self.hidden, self.dropout = hidden, dropout
        self.standardize = Standardize(mean if mean is not None else torch.zeros(feature_dim),
                                       std if std is not None else torch.ones(feature_dim))
        self.classifier = HEADS[kind](feature_dim, num_classes, hidden, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.standardize(features.float()))

    def spec(self) -> dict:
        return {"head": self.kind, "feature_dim": self.feature_dim, "num_classes": self.num_classes,
                "hidden": self.hidden, "dropout": self.dropout}

    @classmethod
    def from_spec(cls, spec: dict) -> "Head":
        return cls(spec["head"], spec["feature_dim"], spec["num_classes"], spec["hidden"], spec["dropout"])


@dataclass
class TrainConfig:
    """Hyperparameters of one head run."""

    head: str = "linear"
    epochs: int = 3
    lr: float = 1e-2
    wd: float = 1e-4
    batch_size: int = 256
    schedule: str = "onecycle"
    seed: int = 0
    views: int = 0
    hidden: int = 512
    dropout: float = 0.5

    def validate(self, views_in_store: int) -> None:
        if self.head not in HEADS:
            raise PipelineError(f"--head {self.head!r} is not one of {', '.join(HEADS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineError(f"--lr {self.lr} is out of range; give a positive learning rate such as 1e-2")
        if self.wd < 0:
            raise PipelineError(f"--wd {self.wd} is out of range; give a weight decay >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise PipelineError("--epochs and --batch-size must be at least 1")
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"--dropout {self.dropout} is out of range; give a fraction in [0, 1)")
        if self.views < 0 or self.views > views_in_store:
            raise PipelineError(f"--views {self.views} is more than the store holds ({views_in_store} augmented "
                                f"views per image); featurize with --views {self.views} or ask for fewer")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise PipelineError(f"--max-memory {text!r} is not a size; give one like 4G or 512M") from None


class SplitFeatures:
    """The rows of one split to use (a view mask), read in chunk-shuffled order from memory or from HDF5.

    Both ways draw the same order from the same seed, so they train identically: each epoch shuffles the
    chunk order, takes `buffer_chunks` chunks at a time and shuffles the rows within them.
    """

    def __init__(self, features: h5py.Dataset, labels: np.ndarray, rows: np.ndarray, in_memory: bool,
                 chunk_rows: int | None = None, buffer_chunks: int = 16):
        self.dataset = features
        self.labels = torch.as_tensor(labels.astype(np.int64))
        self.rows = rows
        self.num_rows = len(rows)
        self.chunk_rows = chunk_rows or (features.chunks[0] if features.chunks else 1024)
        self.buffer_chunks = buffer_chunks
        self.memory = torch.from_numpy(features[()]) if in_memory else None

    def select(self, rows: np.ndarray) -> "SplitFeatures":
        """The same split (sharing its in-memory copy) with other rows selected."""
        other = object.__new__(SplitFeatures)
        other.__dict__.update(self.__dict__)
        other.rows, other.num_rows = rows, len(rows)
        return other

    @property
    def in_memory(self) -> bool:
        return self.memory is not None

    def _groups(self, rng: np.random.Generator | None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Per buffer: the row span read and the selected rows in it, shuffled when rng is given."""
        n = self.dataset.shape[0]
        chunks = np.arange(math.ceil(n / self.chunk_rows))
        if rng is not None:
            chunks = rng.permutation(chunks)
        wanted = np.zeros(n, dtype=bool)
        wanted[self.rows] = True
        for i in range(0, len(chunks), self.buffer_chunks):
            group = np.sort(chunks[i:i + self.buffer_chunks])
            rows = np.concatenate([np.arange(c * self.chunk_rows, min(n, (c + 1) * self.chunk_rows)) for c in group])
            rows = rows[wanted[rows]]
            if rng is not None:
                rows = rows[rng.permutation(len(rows))]
            if len(rows):
                yield group, rows

    def _read(self, group: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[torch.from_numpy(rows)]
        # Read each chunk of the group as a contiguous slice, then gather: h5py fancy indexing is slow.
        spans = [(c * self.chunk_rows, min(self.dataset.shape[0], (c + 1) * self.chunk_rows)) for c in group]
        block = np.concatenate([self.dataset[a:b] for a, b in spans])
        offsets = np.concatenate([np.arange(a, b) for a, b in spans])
        position = np.searchsorted(offsets, rows)
        return torch.from_numpy(block[position])

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features float32, labels) batches over the selected rows; shuffled when rng is given."""
        carry_x, carry_y = [], []
        held = 0
        for group, rows in self._groups(rng):
            x, y = self._read(group, rows), self.labels[torch.from_numpy(rows)]
            carry_x.append(x)
            carry_y.append(y)
            held += len(rows)
            if held >= batch_size:
                x, y = torch.cat(carry_x), torch.cat(carry_y)
                full = (held // batch_size) * batch_size
                for i in range(0, full, batch_size):
                    yield x[i:i + batch_size].float(), y[i:i + batch_size]
                carry_x, carry_y, held = [x[full:]], [y[full:]], held - full
        if held:
            yield torch.cat(carry_x).float(), torch.cat(carry_y)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation over the selected rows, in one streaming pass."""
        total = torch.zeros(self.dataset.shape[1], dtype=torch.float64)
        square = torch.zeros_like(total)
        for x, _ in self.batches(65536):
            x = x.double()
            total += x.sum(0)
            square += x.square().sum(0)
        mean = total / self.num_rows
        std = (square / self.num_rows - mean.square()).clamp_min(0).sqrt()
        return mean.float(), std.float().clamp_min(1e-6)


def select_rows(views: np.ndarray, max_view: int) -> np.ndarray:
    """Indices of rows whose view is at most max_view (0 = the plain view)."""
    return np.flatnonzero(views <= max_view)


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int):
    """Per-step learning-rate schedule: one-cycle (fast.ai's fit_one_cycle), cosine to zero, or constant.

    One-cycle warms up from lr/25 to lr over the first quarter, then anneals to lr/25e4, both along a cosine;
    written out rather than torch's OneCycleLR, which fails on runs of fewer than four steps.
    """
    up = max(1, int(0.25 * total_steps))

    def one_cycle(step: int) -> float:
        if step < up:
            return _cosine_between(1 / 25, 1.0, step / up)
        return _cosine_between(1.0, 1 / 25e4, (step - up) / max(1, total_steps - up))

    factors = {"onecycle": one_cycle,
               "cosine": lambda step: _cosine_between(1.0, 0.0, step / total_steps),
               "constant": lambda step: 1.0}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[schedule])


def schedule_values(schedule: str, lr: float, total_steps: int) -> list[float]:
    """The learning rate at each step of a schedule (for plots and tests)."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer, schedule, lr, total_steps)
    values = []
    for _ in range(total_steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@torch.no_grad()
def evaluate_head(head: Head, data: SplitFeatures, batch_size: int = 4096) -> dict:
    """Loss, accuracy, per-class accuracy and predictions of a head on a split, in row order."""
    head.eval()
    losses, predictions, labels = [], [], []
    for x, y in data.batches(batch_size):
        logits = head(x)
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        predictions.append(logits.argmax(1))
        labels.append(y)
    predicted, truth = torch.cat(predictions), torch.cat(labels)
    per_class = {int(c): (predicted[truth == c] == c).float().mean().item() for c in truth.unique()}
    return {"loss": sum(losses) / len(truth), "accuracy": (predicted == truth).float().mean().item(),
            "per_class_accuracy": per_class}


def train_head(train: SplitFeatures, valid: SplitFeatures | None, cfg: TrainConfig, num_classes: int,
               on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int, int], None] | None = None):
    """Train a fresh head on cached features; returns the head, its per-epoch history and per-step losses."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean, std = train.mean_std()
    head = Head(cfg.head, train.dataset.shape[1], num_classes, cfg.hidden, cfg.dropout, mean, std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    steps_per_epoch = math.ceil(train.num_rows / cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.lr, steps_per_epoch * cfg.epochs)
    history, step_losses = [], []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        head.train()
        total, seen = 0.0, 0
        for step, (x, y) in enumerate(train.batches(cfg.batch_size, rng)):
            loss = F.cross_entropy(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(loss.item())
            total += step_losses[-1] * len(y)
            seen += len(y)
            if on_step:
                on_step(step + 1, steps_per_epoch)
        row = {"epoch": epoch, "train_loss": total / seen}
        if valid is not None:
            result = evaluate_head(head, valid)
            row.update(valid_loss=result["loss"], accuracy=result["accuracy"])
        row["time"] = time.perf_counter() - started
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return head, history, step_losses


def smooth(values: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction, as fast.ai's lr_find uses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float]) -> dict:
    """Suggestions from an lr-find curve: steepest descent, minimum/10, and fast.ai's 'valley'.

    The valley (the middle of the longest decreasing stretch of the curve) is what `--lr auto` uses: on
    cached features a head learns so fast that the smoothed minimum lags to just before divergence.
    """
    lrs_a, loss = np.asarray(lrs), np.asarray(smoothed)
    best = int(np.argmin(loss))
    # Steepest descent before the minimum, ignoring the noisy first tenth of the sweep.
    start = min(len(loss) // 10, max(best - 1, 0))
    slopes = np.gradient(loss, np.log10(lrs_a)) if len(loss) > 1 else np.zeros(1)
    steepest = start + int(np.argmin(slopes[start:max(best, start + 1)]))
    return {"steepest": float(lrs_a[steepest]), "minimum_div10": float(lrs_a[best] / 10),
            "minimum": float(lrs_a[best]), "valley": float(lrs_a[_valley(loss)])}


def _valley(loss: np.ndarray) -> int:
    """Index halfway into the longest decreasing subsequence of the loss curve."""
    n = len(loss)
    length = np.ones(n, dtype=int)
    for i in range(1, n):
        earlier = length[:i][loss[:i] > loss[i]]
        if len(earlier):
            length[i] = earlier.max() + 1
    end = int(np.argmax(length))
    start = end - int(length[end]) + 1
    return start + (end - start) // 2


def lr_find(train: SplitFeatures, cfg: TrainConfig, num_classes: int, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_iter: int = 100, stop_factor: float = 4.0) -> dict:
    """Learning-rate range test: an exponential sweep that stops once the smoothed loss exceeds 4x its best."""
    if not 0 < start_lr < end_lr:
        raise PipelineError(f"lr-find range {start_lr}..{end_lr} is empty; give 0 < --start-lr < --end-lr")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean, std = train.mean_std()
    head = Head(cfg.head, train.dataset.shape[1], num_classes, cfg.hidden, cfg.dropout, mean, std).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=start_lr, weight_decay=cfg.wd)
    factor = (end_lr / start_lr) ** (1 / max(1, num_iter - 1))
    lrs, losses = [], []
    batches = iter(())
    for i in range(num_iter):
        lr = start_lr * factor ** i
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:
            batches = train.batches(cfg.batch_size, rng)
            x, y = next(batches)
        loss = F.cross_entropy(head(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lrs.append(lr)
        losses.append(loss.item())
        smoothed = smooth(losses)
        if not math.isfinite(losses[-1]) or (i > 10 and smoothed[-1] > stop_factor * min(smoothed)):
            break
    smoothed = smooth(losses)
    if not all(math.isfinite(v) for v in smoothed):
        finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
        lrs, losses, smoothed = [lrs[i] for i in finite], [losses[i] for i in finite], [smoothed[i] for i in finite]
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed, **suggest_lr(lrs, smoothed)}


def load_head(run_dir: Path | str) -> tuple[Head, dict]:
    """Rebuild a trained head and its config from a run directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.json", HEAD_FILE):
        if not (run_dir / name).is_file():
            raise PipelineError(f"{run_dir} is not a head run: {name} is missing; give a directory written by "
                                "pipeline train-head")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        head = Head.from_spec(config["head"])
        head.load_state_dict(load_file(str(run_dir / HEAD_FILE)), strict=True)
    except (ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise PipelineError(f"{run_dir} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            "train the head again") from None
    return head.eval(), config
