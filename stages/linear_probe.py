"""The logreg head: multinomial logistic regression fitted to convergence with L-BFGS on standardized features.

Its L2 strength is chosen by k-fold cross-validation on the training split alone (the linear-probe protocol of the
CLIP paper), and its temperature is fitted on the out-of-fold logits of that choice, so neither ever sees valid.

Where rows are plenty (more than k x HELD_OUT_ROWS plain rows) one held-out share of about HELD_OUT_ROWS images
replaces the k folds: its loss is then estimated to a percent, and a fit on the rest is as good as one on all. The L2
path is walked on a sample of PATH_ROWS of the other rows, the chosen strength is fitted on all of them from the
sample's solution in a few full passes, and the temperature is fitted on that fit's held-out logits. The work is a
few big matrix products per pass over float32 blocks converted from the stored rows, never a float32 copy of them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from stages.head import ONE_BATCH_BYTES, SINGLE, Head, Rows, raw_outputs, settle
from stages.tasks import Task

# Strongest first, half a decade apart: the strongly regularized fits are quick and warm-start the weaker ones.
L2_GRID = tuple(10.0 ** (e / 2) for e in range(2, -13, -1))
PATIENCE = 2  # stop the path once this many weaker strengths in a row do no better out of fold
MAX_ITER = 1000
HELD_OUT_ROWS = 10_000  # plain rows held out where rows are plenty (a loss estimated to about 1%)
PATH_ROWS = 20_000  # rows the L2 path is walked on where rows are plenty (each strength a fit of seconds at most)
# L-BFGS iterations of the chosen strength over every row, from the sample's solution: on 900,000 rows of 10
# Gaussian classes, 4 reach 97.83% valid accuracy where the converged fit (16) gives 97.84%; a pass is about a second.
FINAL_ITERATIONS = 4
# The gradient the held-out path's fits stop at: its sample's loss is known to about 1% at best, and stopping at 1e-4
# rather than 1e-5 chose the same strength in half the time (1e6 rows of 10 Gaussian classes: 2.9 s vs 5.2 s).
PATH_TOLERANCE = 1e-4

# (features, the same transposed and contiguous, labels): skinny products run several times faster this way round.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Batches = Callable[[], Iterable[Batch]]


def as_batch(x: torch.Tensor, y: torch.Tensor) -> Batch:
    return x, x.T.contiguous(), y


def solve(
    batches: Batches,
    rows: int,
    init: torch.Tensor,
    l2: float,
    max_iter: int = MAX_ITER,
    task: Task = SINGLE,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """Minimize the task's mean loss + l2/2 |W|^2 over all batches by full-batch L-BFGS; weights (C, D+1), bias
    last (softmax: multinomial logistic regression; sigmoid: one-vs-rest; identity: ridge regression).

    The gradient is written out (the task's residual, activation minus target, times the features), batch by
    batch: the same fit whether the rows are in memory or streamed.
    """
    weight = init.clone()
    optimizer = torch.optim.LBFGS(
        [weight],
        lr=1,
        max_iter=max_iter,
        max_eval=max_iter + max_iter // 4 + 1,  # a pass each: the few iterations of a large fit are its cost
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        w, b = weight[:, :-1], weight[:, -1:]
        grad = torch.zeros_like(weight)
        total = 0.0
        for x, xt, y in batches():
            loss, error = task.residual(torch.addmm(b, w, xt), y)  # (C, n)
            total += loss
            grad[:, :-1] += error @ x
            grad[:, -1] += error.sum(1)
        grad /= rows
        grad[:, :-1] += l2 * w
        weight.grad = grad
        return torch.tensor(total / rows + l2 / 2 * w.square().sum().item())

    optimizer.step(closure)
    return weight.detach()


def fold_count(plain_rows: int, k: int) -> tuple[int, bool]:
    """The folds to deal train's images into, and whether the first is a held-out share rather than one of k folds
    (train_logreg's held_out): past k x HELD_OUT_ROWS plain rows, as many folds as leave about HELD_OUT_ROWS each."""
    if plain_rows <= k * HELD_OUT_ROWS:
        return k, False
    return max(k, plain_rows // HELD_OUT_ROWS), True


def _logits(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ weight[:, :-1].T + weight[:, -1]


def cross_validate(
    x: torch.Tensor,
    y: torch.Tensor,
    folds: np.ndarray,
    scored: np.ndarray,
    num_classes: int,
    grid: tuple[float, ...] = L2_GRID,
    on_strength: Callable[[dict], None] | None = None,
    task: Task = SINGLE,
    held_out: bool = False,
) -> dict:
    """Walk an L2 path from strong to weak with k-fold fits warm-started along it; keep the best out-of-fold loss.

    Rows are scored out of fold where `scored` is true (the plain views); with held_out only fold 0 is (one fit,
    on the other folds). Returns the chosen strength, its out-of-fold logits and labels of the scored rows, the
    fold weights and the path table. x is spent: each fold copies its rows, and x's storage is released.
    """
    k = 1 if held_out else int(folds.max()) + 1
    tolerance = PATH_TOLERANCE if held_out else 1e-5
    if held_out:
        scored = scored & (folds == 0)
    copies = []
    for f in range(k):
        inside = torch.from_numpy(folds != f)
        held = torch.from_numpy((folds == f) & scored)
        copies.append((x[inside], y[inside], x[held], held))
    dim = x.shape[1]
    x.set_()  # the folds hold copies of its rows: its storage is released (the caller's x is spent) ...
    split = [(as_batch(xi, yi), xh, held) for xi, yi, xh, held in copies]  # ... before their transposes are made
    del copies
    scored_t = torch.from_numpy(scored)
    outputs = task.outputs(num_classes)
    weights = [torch.zeros(outputs, dim + 1) for _ in range(k)]
    best, path = None, []
    for step, l2 in enumerate(grid):
        started = time.perf_counter()
        oof = torch.zeros(len(y), outputs)
        for f, (batch, xh, held) in enumerate(split):
            weights[f] = solve(
                lambda batch=batch: [batch], len(batch[2]), weights[f], l2, task=task, tolerance=tolerance
            )
            oof[held] = _logits(weights[f], xh)
        logits, labels = oof[scored_t], y[scored_t]
        scores = task.metrics(task.activation(logits).numpy(), labels.numpy())
        row = {
            "l2": l2,
            "cv_loss": task.loss(logits, labels).item(),
            f"cv_{task.primary}": scores[task.primary],
            "time": time.perf_counter() - started,
        }
        path.append(row)
        if on_strength:
            on_strength(row)
        if best is None or row["cv_loss"] < best["cv_loss"]:
            best = {**row, "step": step, "logits": logits, "labels": labels, "weights": [w.clone() for w in weights]}
        elif step - best["step"] >= PATIENCE:
            break
    return {**best, "path": path}


def fold_logits(train: Rows, folds: np.ndarray, head: Head, l2: float, task: Task = SINGLE) -> torch.Tensor:
    """Out-of-fold raw outputs of every selected row (in train.rows' order) at one strength: per fold, a fit on the
    other folds warm-started from the head's weights (a fit on all rows is close to every fold's, so few iterations
    are needed), standardized as the head is. Rows are read in blocks: no float32 copy of a large split."""
    mean, std = head.standardize.mean, head.standardize.std
    init = torch.cat([head.classifier.weight.detach(), head.classifier.bias.detach()[:, None]], 1)
    fold_head = copy.deepcopy(head)
    logits = torch.zeros(train.num_rows, init.shape[0])
    for f in range(int(folds.max()) + 1):
        inside = train.select(train.rows[folds != f])
        weight = solve(_standardized(inside, mean, std), inside.num_rows, init, l2, task=task)
        with torch.no_grad():
            fold_head.classifier.weight.copy_(weight[:, :-1])
            fold_head.classifier.bias.copy_(weight[:, -1])
        held = np.flatnonzero(folds == f)
        held = held[np.argsort(train.rows[held], kind="stable")]  # raw_outputs gives rows in ascending order
        logits[torch.from_numpy(held)] = raw_outputs(fold_head, train.select(train.rows[held]))[0]
    return logits


def _sample(train: Rows, max_rows: int, seed: int) -> np.ndarray:
    """Indices into train.rows of the rows cross-validation uses: all of them, or a seeded sample of max_rows."""
    if train.num_rows <= max_rows:
        return np.arange(train.num_rows)
    return np.sort(np.random.default_rng(seed).choice(train.num_rows, max_rows, replace=False))


def train_logreg(
    train: Rows,
    folds: np.ndarray,
    plain: np.ndarray,
    num_classes: int,
    l2: float | None = None,
    calibrate: bool = True,
    seed: int = 0,
    cv_max_rows: int = 200_000,
    on_strength: Callable[[dict], None] | None = None,
    task: Task = SINGLE,
    held_out: bool = False,
) -> tuple[Head, dict]:
    """Fit a logreg head on the selected train rows (folds and plain-view mask given per selected row).

    With l2 None the strength is cross-validated (held_out: on fold 0 alone, the head then fitted on the other
    folds); the final fit is full-batch L-BFGS over its rows, from memory or streamed from HDF5. Returns the head
    (temperature set when calibrate) and a summary (with the out-of-fold logits, before the temperature, of the
    scored rows in their order, and their count `cv_rows`).
    """
    fitted = train.select(train.rows[folds != 0]) if held_out else train
    mean, std = fitted.mean_std()
    if held_out:  # the path on a sample of the fitted rows, scored on the held-out plain rows
        path_rows = np.flatnonzero(folds != 0)[_sample(fitted, PATH_ROWS, seed)]
        sample = np.sort(np.r_[path_rows, np.flatnonzero(folds == 0)])
    else:
        sample = _sample(train, cv_max_rows, seed)
    summary = {"l2": l2, "temperature": 1.0, "path": []}
    init = torch.zeros(task.outputs(num_classes), train.dim + 1)
    head = Head("logreg", train.dim, num_classes, mean=mean, std=std, task=task.name)
    if l2 is None or calibrate:  # out-of-fold logits: to choose the strength, and to fit the temperature on
        grid = L2_GRID if l2 is None else (l2,)
        x, y = _standardized_copy(train.select(train.rows[sample]), mean, std)
        cv = cross_validate(x, y, folds[sample], plain[sample], num_classes, grid, on_strength, task, held_out)
        init = torch.stack(cv["weights"]).mean(0)
        score = f"cv_{task.primary}"
        summary.update(l2=cv["l2"], path=cv["path"], cv_loss=cv["cv_loss"], out_of_fold_logits=cv["logits"])
        summary.update({score: cv[score], "cv_rows": len(cv["labels"])})
        labels = cv["labels"]
    started = time.perf_counter()
    warm = l2 is None or calibrate  # from the path's solution: a few passes over every row finish it
    iterations = FINAL_ITERATIONS if held_out and warm else MAX_ITER
    weight = solve(_standardized(fitted, mean, std), fitted.num_rows, init, summary["l2"], iterations, task)
    summary["fit_seconds"] = time.perf_counter() - started
    with torch.no_grad():
        head.classifier.weight.copy_(weight[:, :-1])
        head.classifier.bias.copy_(weight[:, -1])
    if held_out and "out_of_fold_logits" in summary:  # the held-out rows scored by the head itself
        logits, labels = raw_outputs(head, train.select(train.rows[(folds == 0) & plain]))
        summary.update(out_of_fold_logits=logits, cv_loss=task.loss(logits, labels).item())
    if calibrate:
        settle(head, summary["out_of_fold_logits"], labels)
    summary["temperature"] = head.temperature.tolist()
    return head, summary


def _standardized_copy(rows: Rows, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected rows standardized into one float32 tensor (in their order) and their labels."""
    if rows.in_memory:
        x = rows.selected().float().sub_(mean).div_(std)  # in place: one float32 copy
        return x, rows.labels[torch.from_numpy(rows.rows)]
    pairs = list(rows.batches(rows.block_rows))  # fresh tensors: kept
    return torch.cat([(x - mean) / std for x, _ in pairs]), torch.cat([y for _, y in pairs])


def _standardized(rows: Rows, mean: torch.Tensor, std: torch.Tensor) -> Batches:
    """The solver's batches: one standardized float32 copy with its transpose while that is small, else blocks of
    the stored rows converted and standardized in a buffer reused from block to block (float16 rows stay so)."""
    if rows.in_memory and rows.num_rows * rows.dim * 8 <= ONE_BATCH_BYTES:
        batch = as_batch(*_standardized_copy(rows, mean, std))
        return lambda: [batch]

    def blocks():  # each block standardized in place; its transpose a view (a copy costs more than it saves)
        for x, y in rows.whole_pass():
            x.sub_(mean).div_(std)
            yield x, x.T, y

    return blocks
