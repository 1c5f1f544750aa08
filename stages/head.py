"""Heads on cached features: the modules, the rows they train on and their batch order, training and lr-find."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.errors import PipelineError, check_range
from stages.rundir import HEAD_WEIGHTS, RunConfig, read_config, read_weights
from stages.settings import HeadSpec, TrainConfig
from stages.tasks import TASKS, Task, best_thresholds

SINGLE = TASKS["single"]


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
    return nn.Sequential(
        nn.Dropout(dropout / 2),
        nn.Linear(dim, hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )


# logreg is the linear classifier fitted to convergence by L-BFGS (stages/linear_probe.py), not by AdamW.
HEADS: dict[str, Callable[[int, int, int, float], nn.Module]] = {"logreg": _linear, "linear": _linear, "mlp": _mlp}


class Head(nn.Module):
    """Standardize, then a linear or MLP layer, then the calibration temperature: features (N,D) -> raw outputs,
    which the head's task (stages.tasks) turns into probabilities or values.

    The temperature (1 while training; one per class for a multi-label task) is fitted on out-of-fold outputs of
    the training split, so that the activation gives honest probabilities; it never changes which class wins. A
    multi-label head also keeps its thresholds, chosen on those same out-of-fold probabilities.
    """

    def __init__(
        self,
        kind: str,
        feature_dim: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.5,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        task: str = "single",
    ):
        super().__init__()
        if kind not in HEADS:
            raise PipelineError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        self.kind, self.feature_dim, self.num_classes = kind, feature_dim, num_classes
        self.hidden, self.dropout, self.task = hidden, dropout, TASKS[task]
        self.standardize = Standardize(
            mean if mean is not None else torch.zeros(feature_dim), std if std is not None else torch.ones(feature_dim)
        )
        self.classifier = HEADS[kind](feature_dim, self.task.outputs(num_classes), hidden, dropout)
        shape = (num_classes,) if task == "multi" else ()
        self.register_buffer("temperature", torch.full(shape, 1.0).mul_(torch.as_tensor(temperature)))
        if task == "multi":
            self.register_buffer("thresholds", torch.full(shape, 0.5))
        # Its task's conformity scores on its calibration images (stages.tasks, stages.conformal): what prediction
        # sets are calibrated on; empty for a kind without sets, or a head trained before heads kept them.
        self.register_buffer("conformity", torch.zeros(0))
        self._cuts: dict[float, object] = {}  # coverage -> its cut, worked out from the conformity scores once

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.standardize(features.float())) / self.temperature

    def decision_thresholds(self) -> np.ndarray | None:
        """A multi-label head's threshold per class (None: its task decides without)."""
        return self.thresholds.detach().cpu().numpy() if hasattr(self, "thresholds") else None

    def last_layer(self) -> nn.Linear:
        return self.classifier if isinstance(self.classifier, nn.Linear) else self.classifier[-1]

    def spec(self) -> HeadSpec:
        return HeadSpec(self.kind, self.feature_dim, self.num_classes, self.hidden, self.dropout, self.task.name)

    @classmethod
    def from_spec(cls, spec: HeadSpec) -> Head:
        return cls(spec.head, spec.feature_dim, spec.num_classes, spec.hidden, spec.dropout, task=spec.task)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "conformity"
        if key in state_dict:  # as many scores as its calibration had images: the loaded head takes their number
            self.conformity = torch.empty_like(state_dict[key])
            self._cuts.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def coverage_cut(self, coverage: float):
        """The task's cut for prediction sets at that coverage (stages.conformal), worked out once per coverage; an
        error for a head without conformity scores (a numeric head, one trained with --no-calibrate or before heads
        kept them)."""
        check_range("--coverage", coverage, 1e-6, 1 - 1e-6)
        if not self.conformity.numel():
            raise PipelineError(
                "--coverage needs a single- or multi-label head trained with calibration (it keeps the scores "
                "prediction sets are calibrated on): train it again without --no-calibrate"
            )
        if coverage not in self._cuts:
            self._cuts[coverage] = self.task.coverage_cut(self.conformity.numpy(), coverage)
        return self._cuts[coverage]

    def prediction_sets(self, probabilities: np.ndarray, coverage: float) -> np.ndarray:
        """(N, C) booleans: each image's classes at that coverage."""
        return self.task.sets_at(probabilities, self.coverage_cut(coverage))


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise PipelineError(f"--max-memory {text!r} is not a size; give one like 4G or 512M") from None


class Rows:
    """The rows of one split a head trains on (a selection of the split's stored rows) with their labels, drawn in
    a chunk-shuffled order that depends on the seed alone: each epoch shuffles the chunk order, takes
    `buffer_chunks` chunks at a time and shuffles the rows within them. Features held in memory (TensorRows) and
    features streamed from a store (store.reader.StoredRows) therefore give the same batches, and the same head.
    A subclass says how stored rows are read (_gather)."""

    in_memory = False

    def __init__(
        self,
        labels: np.ndarray,
        rows: np.ndarray,
        num_stored: int,
        dim: int,
        name: str = "",
        chunk_rows: int = 1024,
        buffer_chunks: int = 16,
        block_rows: int = 65536,
    ):
        labels = np.asarray(labels)  # class indices; or 0/1 rows of classes, or values (stages.tasks)
        single = labels.ndim == 1 and labels.dtype.kind in "iub"
        self.labels = torch.as_tensor(labels.astype(np.int64) if single else labels.astype(np.float32))
        self.rows = np.asarray(rows)
        self.num_rows = len(self.rows)
        self.num_stored, self.dim, self.name = num_stored, dim, name
        self.chunk_rows, self.buffer_chunks = chunk_rows, buffer_chunks
        self.block_rows = block_rows  # rows per block of a whole pass (statistics, logreg's gradient)

    def _gather(self, chunks: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """The stored rows `rows` (all within the chunks `chunks`), as stored (float16 or float32)."""
        raise NotImplementedError

    def select(self, rows: np.ndarray) -> Rows:
        """The same split (sharing what it holds) with other rows selected."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.rows, other.num_rows = np.asarray(rows), len(rows)
        return other

    def _groups(self, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per buffer: its chunks and the selected rows in them, shuffled when rng is given."""
        n = self.num_stored
        chunks = np.arange(math.ceil(n / self.chunk_rows))
        if rng is not None:
            chunks = rng.permutation(chunks)
        wanted = np.zeros(n, dtype=bool)
        wanted[self.rows] = True
        for i in range(0, len(chunks), self.buffer_chunks):
            group = np.sort(chunks[i : i + self.buffer_chunks])
            rows = np.concatenate([np.arange(c * self.chunk_rows, min(n, (c + 1) * self.chunk_rows)) for c in group])
            rows = rows[wanted[rows]]
            if rng is not None:
                rows = rows[rng.permutation(len(rows))]
            if len(rows):
                yield group, rows

    def batches(
        self, batch_size: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features float32, labels) batches over the selected rows; shuffled when rng is given."""
        carry_x, carry_y = [], []
        held = 0
        for group, rows in self._groups(rng):
            x, y = self._gather(group, rows), self.labels[torch.from_numpy(rows)]
            carry_x.append(x)
            carry_y.append(y)
            held += len(rows)
            if held >= batch_size:
                x, y = torch.cat(carry_x), torch.cat(carry_y)
                full = (held // batch_size) * batch_size
                for i in range(0, full, batch_size):
                    yield x[i : i + batch_size].float(), y[i : i + batch_size]
                carry_x, carry_y, held = [x[full:]], [y[full:]], held - full
        if held:
            yield torch.cat(carry_x).float(), torch.cat(carry_y)

    def whole_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every selected row once, in ascending order, as float32 blocks of at most block_rows rows with their
        labels: for a pass that sums over rows (statistics, logreg's gradient). A block may live in a buffer reused
        for the next one: use it before drawing the next."""
        rows = np.sort(self.rows)
        for i in range(0, len(rows), self.block_rows):
            part = rows[i : i + self.block_rows]
            chunks = np.unique(part // self.chunk_rows)
            yield self._gather(chunks, part).float(), self.labels[torch.from_numpy(part)]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation over the selected rows, in one pass."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        square = torch.zeros_like(total)
        for x, _ in self.whole_pass():  # float32 sums per block (torch sums pairwise), float64 across blocks
            total += x.sum(0)
            square += x.square_().sum(0)  # the block is not needed after
        if not (torch.isfinite(total).all() and torch.isfinite(square).all()):
            raise PipelineError(
                f"the stored features {self.name} hold NaN or infinite values: the store is damaged; featurize "
                "into a new --store"
            )
        mean = total / self.num_rows
        std = (square / self.num_rows - mean.square()).clamp_min(0).sqrt().float()
        # A feature (near) constant on train can earn no weight, yet divided by its tiny spread it explodes on an
        # image where it fires (generated images: 1e6 standard deviations): an infinite spread drops it instead.
        dead = std <= 1e-3 * std.mean()
        return mean.float(), std.masked_fill(dead, float("inf"))


class TensorRows(Rows):
    """Rows of features held in memory: every stored row of the split, as one tensor."""

    in_memory = True

    def __init__(self, features, labels: np.ndarray, rows: np.ndarray | None = None, **layout):
        self.features = torch.as_tensor(features)
        n, dim = self.features.shape
        super().__init__(labels, np.arange(n) if rows is None else rows, n, dim, **layout)

    def _gather(self, chunks: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        return self.features[torch.from_numpy(rows)]

    def selected(self) -> torch.Tensor:
        """The selected rows' features, as stored, in selection order."""
        return self.features[torch.from_numpy(self.rows)]

    def whole_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As Rows.whole_pass, in blocks of PASS_ROWS converted into one float32 buffer reused from block to block:
        a pass allocates nothing per block and its products run on a block still in cache."""
        rows = np.sort(self.rows)
        size = min(PASS_ROWS, len(rows))
        block, gathered = torch.empty((size, self.dim)), torch.empty((size, self.dim), dtype=self.features.dtype)
        for i in range(0, len(rows), PASS_ROWS):
            part = rows[i : i + PASS_ROWS]
            out = block[: len(part)]
            if part[-1] - part[0] + 1 == len(part):  # a run of stored rows: converted straight from them
                out.copy_(self.features[part[0] : part[-1] + 1])
            else:
                index = torch.from_numpy(part)
                out.copy_(torch.index_select(self.features, 0, index, out=gathered[: len(part)]))
            yield out, self.labels[torch.from_numpy(part)]


PASS_ROWS = 2048  # rows per block of a pass over rows in memory (measured fastest: a float32 block of 1280 is 10 MB)
STREAM_COPIES = 8  # float32 copies of a block alive at once in a whole pass (read, standardized, transposed, ...)


# A fit standardizes rows into one float32 copy with its transpose up to this many bytes, and works on blocks beyond.
ONE_BATCH_BYTES = 1 << 30


def fits_in_memory(features, memory_limit: int) -> bool:
    """Whether a split is held in memory under the limit: its stored values and the float32 copies a fit makes of
    them (logreg's standardized rows and their transpose, up to ONE_BATCH_BYTES)."""
    return features.size * features.dtype.itemsize + min(features.size * 2 * 4, ONE_BATCH_BYTES) <= memory_limit


def stream_block_rows(memory_limit: int, feature_dim: int) -> int:
    """Rows per block of a whole pass over streamed features, so that its working copies stay within the limit."""
    return max(1024, memory_limit // (STREAM_COPIES * 4 * feature_dim))


def select_rows(views: np.ndarray, max_view: int) -> np.ndarray:
    """Indices of rows whose view is at most max_view (0 = the plain view)."""
    return np.flatnonzero(views <= max_view)


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def schedule_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each step of a schedule: one-cycle (fast.ai's fit_one_cycle), cosine to zero,
    or constant.

    One-cycle warms up from lr/25 to lr over the first quarter, then anneals to lr/25e4, both along a cosine;
    written out rather than torch's OneCycleLR, which fails on runs of fewer than four steps.
    """
    up = max(1, int(0.25 * total_steps))

    def one_cycle(step: int) -> float:
        if step < up:
            return _cosine_between(1 / 25, 1.0, step / up)
        return _cosine_between(1.0, 1 / 25e4, (step - up) / max(1, total_steps - up))

    factors = {
        "onecycle": one_cycle,
        "cosine": lambda step: _cosine_between(1.0, 0.0, step / total_steps),
        "constant": lambda step: 1.0,
    }
    return factors[schedule]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int):
    """A per-step learning-rate schedule (schedule_factor) for an optimizer's one group of parameters."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(schedule, total_steps))


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
def evaluate_head(head: Head, data: Rows) -> dict:
    """The loss of a head on a split and its task's figures (single-label: accuracy, calibration error and
    per-class accuracy; multi-label at the head's thresholds)."""
    return evaluate_heads([head], data)[0]


@torch.no_grad()
def evaluate_heads(heads: list[Head], data: Rows) -> list[dict]:
    """evaluate_head for several heads of one task in one pass over the split (each block standardized once when
    they share their standardization, as heads trained together do)."""
    shared = all(
        torch.equal(h.standardize.mean, heads[0].standardize.mean)
        and torch.equal(h.standardize.std, heads[0].standardize.std)
        for h in heads
    )
    outputs, labels = [[] for _ in heads], []
    for h in heads:
        h.eval()
    for x, y in data.whole_pass():
        z = heads[0].standardize(x) if shared else None
        for head, out in zip(heads, outputs):
            out.append(head.classifier(z) / head.temperature if shared else head(x))
        labels.append(y)
    truth = torch.cat(labels)
    results = []
    for head, out in zip(heads, outputs):
        raw, task = torch.cat(out), head.task
        loss = task.loss(raw, truth, reduction="sum").item() / len(truth)
        activated = task.activation(raw).numpy()
        results.append({"loss": loss, **task.metrics(activated, truth.numpy(), head.decision_thresholds())})
    return results


def train_head(
    train: Rows,
    valid: Rows | None,
    cfg: TrainConfig,
    num_classes: int,
    on_epoch: Callable[[dict], None] | None = None,
    task: Task = SINGLE,
):
    """Train a fresh head on cached features for a task (its loss); returns the head, its per-epoch history and
    per-step losses."""
    return train_heads(train, valid, [cfg], num_classes, on_epoch, task)[0]


def train_heads(
    train: Rows,
    valid: Rows | None,
    cfgs: list[TrainConfig],
    num_classes: int,
    on_epoch: Callable[[dict], None] | None = None,
    task: Task = SINGLE,
    max_steps: int | None = None,
) -> list[tuple[Head, list[dict], list[float]]]:
    """Heads of several configs trained together on one stream of batches: each batch is drawn, converted and
    standardized once for all, the linear heads' outputs are one matrix product, and each head follows its own
    learning rate, weight decay, schedule, epochs (at most max_steps steps each) and hidden layer.

    The configs share seed and batch size (the order of the batches). Each head is the one its config trains alone,
    up to float rounding in the shared product: its own initialization, dropout draws (its own random state) and
    optimizer state. Returns (head, per-epoch history, per-step losses) per config; on_epoch sees each epoch of a
    lone config as it ends.
    """
    seed, batch_size = cfgs[0].seed, cfgs[0].batch_size
    if any((c.seed, c.batch_size) != (seed, batch_size) for c in cfgs):
        raise ValueError("heads trained together share their seed and batch size")
    rng = np.random.default_rng(seed)
    mean, std = train.mean_std()
    heads, random_states = [], []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        heads.append(Head(cfg.head, train.dim, num_classes, cfg.hidden, cfg.dropout, mean, std, task=task.name))
        random_states.append(torch.get_rng_state())
    groups = [{"params": list(h.parameters()), "lr": c.lr, "weight_decay": c.wd} for h, c in zip(heads, cfgs)]
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(train.num_rows / batch_size)
    totals = [min(steps_per_epoch * c.epochs, max_steps or math.inf) for c in cfgs]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [schedule_factor(c.schedule, t) for c, t in zip(cfgs, totals)]
    )
    histories, step_losses = [[] for _ in cfgs], [[] for _ in cfgs]
    step = 0
    for epoch in range(max(c.epochs for c in cfgs)):
        started = time.perf_counter()
        training = [i for i, c in enumerate(cfgs) if epoch < c.epochs and step < totals[i]]
        if not training:
            break
        for i in training:
            heads[i].train()
        totals_seen = {i: [0.0, 0] for i in training}
        for x, y in train.batches(batch_size, rng):
            live = [i for i in training if step < totals[i]]
            if not live:
                break
            losses = _stacked_losses(heads, live, random_states, heads[0].standardize(x), y, task)
            optimizer.zero_grad(set_to_none=True)  # a head left out keeps no gradient: AdamW skips it
            losses.sum().backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for i, loss in zip(live, losses.tolist()):
                step_losses[i].append(loss)
                totals_seen[i][0] += step_losses[i][-1] * len(y)
                totals_seen[i][1] += len(y)
        scored = evaluate_heads([heads[i] for i in training], valid) if valid is not None else [None] * len(training)
        for i, result in zip(training, scored):
            row = {"epoch": epoch, "train_loss": totals_seen[i][0] / max(1, totals_seen[i][1])}
            if result is not None:
                row.update(valid_loss=result["loss"], **{task.primary: result[task.primary]})
            row["time"] = time.perf_counter() - started
            histories[i].append(row)
            if on_epoch and len(cfgs) == 1:
                on_epoch(row)
    return [(h, history, losses) for h, history, losses in zip(heads, histories, step_losses)]


def _stacked_losses(
    heads: list[Head], live: list[int], random_states: list, x: torch.Tensor, y: torch.Tensor, task: Task
) -> torch.Tensor:
    """Each live head's mean loss on one standardized batch, in live's order: the linear heads' outputs and losses
    in one product and one loss call when there are several, each MLP on its own random state (its dropout draws
    are those of its lone run)."""
    linear = [i for i in live if isinstance(heads[i].classifier, nn.Linear)] if len(live) > 1 else []
    losses = {}
    if len(linear) > 1:
        weight = torch.cat([heads[i].classifier.weight for i in linear])
        bias = torch.cat([heads[i].classifier.bias for i in linear])
        outputs = heads[linear[0]].classifier.out_features
        raw = torch.nn.functional.linear(x, weight, bias).reshape(len(x) * len(linear), outputs)  # row-major: b, head
        per_row = task.loss(raw, y.repeat_interleave(len(linear), 0), reduction="none")
        losses.update(zip(linear, per_row.reshape(len(x), len(linear)).mean(0)))
    for i in live:
        if i in losses:
            continue
        if len(heads) > 1:
            torch.set_rng_state(random_states[i])
        losses[i] = task.loss(heads[i].classifier(x), y)
        if len(heads) > 1:
            random_states[i] = torch.get_rng_state()
    return torch.stack([losses[i] for i in live])


@torch.no_grad()
def settle(head: Head, raw: torch.Tensor, targets: torch.Tensor) -> None:
    """A trained head made honest from out-of-fold raw outputs of train (never valid): its temperature, and for a
    multi-label head the thresholds, chosen on the calibrated probabilities."""
    head.temperature.copy_(torch.as_tensor(head.task.calibrate(raw, targets)))
    probabilities = head.task.activation(raw / head.temperature).numpy()
    scores = head.task.conformity(probabilities, targets.numpy())
    if scores is not None:
        head.conformity = torch.from_numpy(scores)
        head._cuts.clear()
    if head.task.name == "multi":
        head.thresholds.copy_(torch.from_numpy(best_thresholds(probabilities, targets.numpy())))


@torch.no_grad()
def out_of_fold_logits(
    train: Rows, folds: np.ndarray, plain: np.ndarray, cfgs: list[TrainConfig], num_classes: int, task: Task = SINGLE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per config: raw outputs and labels of each plain-view training row from a head trained the same way on the
    other folds (the configs' heads of a fold trained together: train_heads)."""
    outputs = [([], []) for _ in cfgs]
    for fold in range(int(folds.max()) + 1):
        with torch.enable_grad():
            trained = train_heads(train.select(train.rows[folds != fold]), None, cfgs, num_classes, task=task)
        held = train.select(train.rows[(folds == fold) & plain])
        for (logits, labels), (head, _, _) in zip(outputs, trained):
            raw, truth = raw_outputs(head, held)
            logits.append(raw)
            labels.append(truth)
    return [(torch.cat(logits), torch.cat(labels)) for logits, labels in outputs]


@torch.no_grad()
def raw_outputs(head: Head, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's raw outputs (before its temperature) on rows, in ascending row order, and their labels."""
    head.eval()
    pairs = [(head.classifier(head.standardize(x)), y) for x, y in rows.whole_pass()]
    return torch.cat([r for r, _ in pairs]), torch.cat([y for _, y in pairs])


LR_FIND_MAX_STEPS = 200  # the most optimizer steps one probe of lr-find takes


@dataclass
class LrFindResult:
    """The learning-rate range test: per rate tried, the held-out and train loss; the suggested rate (the lowest
    held-out loss); and the plot once drawn."""

    lrs: list[float]
    held_out_loss: list[float]
    held_out_accuracy: list[float | None]  # None for a task other than single-label: see held_out_score
    train_loss: list[float]
    suggestion: float
    epochs: int
    held_out_rows: int
    plot: str | None = None
    task: str = "single"  # stages.tasks
    held_out_score: list[float] = field(default_factory=list)  # the task's figure: accuracy, mAP or R^2

    def to_json(self) -> dict:
        data = asdict(self)
        if self.plot is None:
            del data["plot"]
        return data


def lr_find(
    train: Rows,
    folds: np.ndarray,
    plain: np.ndarray,
    cfg: TrainConfig,
    num_classes: int,
    start_lr: float = 1e-5,
    end_lr: float = 1.0,
    num_lrs: int = 21,
    on_lr: Callable[[dict], None] | None = None,
    task: Task = SINGLE,
) -> LrFindResult:
    """Learning-rate range test for heads on cached features: a fresh head per rate, each trained as the run
    would be (its schedule and epochs, at most LR_FIND_MAX_STEPS steps) on all folds of train but the first and
    scored on the plain views of that held-out fold; the suggestion is the rate with the lowest held-out loss.
    The probes train together over the same batches (train_heads): one pass over the rows for all the rates.

    fast.ai's single sweep with a smoothed loss suits a network that learns over thousands of steps; a head on
    cached features learns in a handful, so that sweep's curve measures time, not learning rate.
    """
    if not 0 < start_lr < end_lr:
        raise PipelineError(f"lr-find range {start_lr}..{end_lr} is empty; give 0 < --start-lr < --end-lr")
    check_range("--num-lrs", num_lrs, 2, 1000)
    fit_rows = train.select(train.rows[folds != 0])
    held = train.select(train.rows[(folds == 0) & plain])
    steps_per_epoch = math.ceil(fit_rows.num_rows / cfg.batch_size)
    epochs = max(1, min(cfg.epochs, LR_FIND_MAX_STEPS // steps_per_epoch))
    lrs = np.geomspace(start_lr, end_lr, num_lrs)
    probes = [replace(cfg, lr=float(lr), epochs=epochs) for lr in lrs]
    trained = train_heads(fit_rows, None, probes, num_classes, task=task, max_steps=LR_FIND_MAX_STEPS)
    rows = []
    for lr, (head, history, _) in zip(lrs, trained):
        scored = evaluate_head(head, held)
        rows.append(
            {
                "lr": float(lr),
                "held_out_loss": scored["loss"],
                "held_out_accuracy": scored.get("accuracy"),
                "held_out_score": scored[task.primary],
                "train_loss": history[-1]["train_loss"],
            }
        )
        if on_lr:
            on_lr(rows[-1])
        best = min(r["held_out_loss"] for r in rows)
        if not math.isfinite(scored["loss"]) or scored["loss"] > 4 * best:  # diverged: higher rates only get worse
            break
    finite = [r for r in rows if math.isfinite(r["held_out_loss"])]
    best = min(finite, key=lambda r: r["held_out_loss"])
    return LrFindResult(
        lrs=[r["lr"] for r in rows],
        held_out_loss=[r["held_out_loss"] for r in rows],
        held_out_accuracy=[r["held_out_accuracy"] for r in rows],
        task=task.name,
        held_out_score=[r["held_out_score"] for r in rows],
        train_loss=[r["train_loss"] for r in rows],
        suggestion=best["lr"],
        epochs=epochs,
        held_out_rows=held.num_rows,
    )


def load_head(run_dir: Path | str) -> tuple[Head, RunConfig]:
    """Rebuild a trained head and its config from a run directory, checking the config against the head."""
    from safetensors import SafetensorError

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        head = Head.from_spec(config.head)
        state = read_weights(run_dir / HEAD_WEIGHTS)
        state.setdefault("temperature", torch.tensor(1.0))  # heads saved before calibration existed
        state.setdefault("conformity", torch.zeros(0))  # ... or before prediction sets
        head.load_state_dict(state, strict=True)
    except (ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise PipelineError(
            f"{run_dir} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); train the head again"
        ) from None
    return head.eval(), config
