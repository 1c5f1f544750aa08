"""What a head predicts, one class per kind of task: its activation, loss, decision, metrics and outputs.

A head is standardize, then a linear or MLP layer, giving raw outputs; its task says what they mean. As fastai's
loss functions own their activation and decoding, a Task owns everything that depends on the kind of target, so a
fourth kind is one more class here, registered in TASKS, and no edit elsewhere:

    single   one class per image        softmax, cross-entropy, the most probable class    accuracy, ECE
    multi    any number of classes      sigmoid, binary cross-entropy, a threshold each    mAP, micro/macro F1
    numeric  a number                   identity, squared error, the value itself          MAE, RMSE, R^2
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stages import conformal
from stages.calibration import expected_calibration_error, fit_temperature


class Task:
    """The base of a task kind: `name` as configs and the CLI spell it, `primary` the metric an epoch table shows
    and a grid ranks by (higher is better), `output` what an exported model's output is called, `outputs` the
    width of a head's last layer."""

    name = ""
    primary = ""
    output = "probabilities"

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(self, raw: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss of raw outputs (N, outputs) against targets: their mean, sum, or one per row ("none")."""
        raise NotImplementedError

    def activation(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs as what a user reads: probabilities, or values."""
        raise NotImplementedError

    def residual(self, raw_t: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        """For a linear head's solver (stages.linear_probe), raw outputs laid out (outputs, rows): the loss summed
        over the rows, and its gradient with respect to them, computed in place of raw_t (each kind's loss is a
        generalized linear model's, so the gradient is its activation minus the target)."""
        raise NotImplementedError

    def decide(self, activated: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        """The prediction: a class index per row, a 0/1 row of classes, or a value."""
        raise NotImplementedError

    def metrics(self, activated: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
        """The split's figures, `primary` among them."""
        raise NotImplementedError

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """A class per row for stratified folds (stages.calibration.image_folds)."""
        raise NotImplementedError

    def calibrate(self, raw: torch.Tensor, targets: torch.Tensor) -> float | torch.Tensor:
        """The temperature of honest probabilities, fitted on out-of-fold raw outputs (1: none)."""
        return 1.0

    def prediction(self, activated: np.ndarray, classes: list[str], thresholds=None, k: int = 1) -> dict:
        """One image's prediction as a user reads it (predict's JSON, the Python API)."""
        raise NotImplementedError

    def conformity(self, activated: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
        """Calibration images' conformity scores, what prediction sets are calibrated on (stages.conformal); None:
        this kind gives no sets."""
        return None

    def coverage_cut(self, conformity: np.ndarray, coverage: float):
        """What a set is cut at for that coverage, from the calibration's conformity scores (once per coverage)."""
        raise NotImplementedError

    def sets_at(self, activated: np.ndarray, cut) -> np.ndarray:
        """(N, C) booleans: each image's set of classes at a coverage_cut."""
        raise NotImplementedError

    def coverage_table(self, activated: np.ndarray, targets: np.ndarray, conformity: np.ndarray) -> list[dict]:
        """evaluate's figures of the sets at each coverage asked (stages.conformal.COVERAGES)."""
        raise NotImplementedError

    def csv_columns(self, classes: list[str]) -> list[str]:
        """predict's CSV columns for a prediction, after the path."""
        raise NotImplementedError

    def csv_cells(self, prediction: dict, classes: list[str], prefix: str = "") -> list[str]:
        """A prediction (its keys under `prefix`: tta_ for the TTA one) as those columns."""
        raise NotImplementedError


class SingleLabel(Task):
    name, primary = "single", "accuracy"

    def loss(self, raw: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(raw, targets, reduction=reduction)

    def activation(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.softmax(1)

    def residual(self, raw_t: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        columns = torch.arange(len(targets))
        log_p = raw_t.log_softmax(0)
        loss = -log_p[targets, columns].sum().item()
        error = log_p.exp_()
        error[targets, columns] -= 1
        return loss, error

    def decide(self, activated: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(activated).argmax(1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return np.asarray(targets)

    def calibrate(self, raw: torch.Tensor, targets: torch.Tensor) -> float:
        return fit_temperature(raw, targets)

    def conformity(self, activated: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.sort(conformal.aps_scores(activated, targets)).astype(np.float32)  # APS: adaptive sets

    def coverage_cut(self, conformity: np.ndarray, coverage: float) -> float:
        return conformal.threshold(conformity, coverage)

    def sets_at(self, activated: np.ndarray, cut: float) -> np.ndarray:
        return conformal.prediction_sets(activated, cut)

    def coverage_table(self, activated: np.ndarray, targets: np.ndarray, conformity: np.ndarray) -> list[dict]:
        return conformal.coverage_table(activated, targets, conformity)

    def prediction(self, activated: np.ndarray, classes: list[str], thresholds=None, k: int = 1) -> dict:
        """The most likely class, its probability, the k most likely as [class, probability] pairs, and every
        class's probability."""
        order = np.argsort(-activated)[:k]
        return {
            "class": classes[order[0]],
            "probability": float(activated[order[0]]),
            "top_k": [[classes[i], float(activated[i])] for i in order],
            "probabilities": {c: float(p) for c, p in zip(classes, activated)},
        }

    def csv_columns(self, classes: list[str]) -> list[str]:
        return ["class", "probability", *classes]

    def csv_cells(self, prediction: dict, classes: list[str], prefix: str = "") -> list[str]:
        probabilities = prediction[f"{prefix}probabilities"]
        return [
            prediction[f"{prefix}class"],
            f"{prediction[f'{prefix}probability']:.6f}",
            *(f"{probabilities[c]:.6f}" for c in classes),
        ]

    def metrics(self, activated: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
        probabilities, truth = np.asarray(activated), np.asarray(targets)
        predicted = self.decide(probabilities)
        return {
            "accuracy": float((predicted == truth).mean()),
            "ece": expected_calibration_error(probabilities, truth),
            "per_class_accuracy": {int(c): float((predicted[truth == c] == c).mean()) for c in np.unique(truth)},
        }


class MultiLabel(Task):
    """Each class a yes or no of its own. Thresholds are chosen per class on out-of-fold probabilities of the
    training split (never on valid): the one with the best F1, 0.5 where the class has no positive there."""

    name, primary = "multi", "map"

    def loss(self, raw: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(raw, targets, reduction="none").sum(1)  # per image
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()

    def activation(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.sigmoid()

    def residual(self, raw_t: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        truth = targets.T
        loss = (F.softplus(raw_t) - truth * raw_t).sum().item()
        return loss, raw_t.sigmoid_().sub_(truth)

    def decide(self, activated: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        probabilities = np.asarray(activated)
        cut = np.full(probabilities.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
        return (probabilities >= cut).astype(np.uint8)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """Its rarest class each image carries (none: one more stratum), so rare classes spread over the folds."""
        targets = np.asarray(targets).astype(bool)
        rarity = np.where(targets, targets.sum(0), np.iinfo(np.int64).max)
        return np.where(targets.any(1), rarity.argmin(1), targets.shape[1])

    def calibrate(self, raw: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A temperature per class minimizing its binary log loss (1 for a class with no error to learn from)."""
        raw, targets = raw.detach().float(), targets.float()
        log_t = torch.zeros(raw.shape[1], requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(raw / log_t.exp(), targets, reduction="none").mean(0).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        separable = ((raw > 0) == targets.bool()).all(0)  # no mistake: the loss falls for ever as T shrinks
        return log_t.detach().exp().clamp(0.05, 20.0).masked_fill(separable, 1.0)

    def prediction(self, activated: np.ndarray, classes: list[str], thresholds=None, k: int = 1) -> dict:
        """The classes whose probability reaches their threshold, and every class's probability."""
        chosen = self.decide(activated[None], thresholds)[0]
        return {
            "labels": [c for c, on in zip(classes, chosen) if on],
            "probabilities": {c: float(p) for c, p in zip(classes, activated)},
        }

    def conformity(self, activated: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return conformal.class_scores(activated, targets)  # per class, on the images that carry it

    def coverage_cut(self, conformity: np.ndarray, coverage: float) -> np.ndarray:
        return conformal.class_thresholds(conformity, coverage)

    def sets_at(self, activated: np.ndarray, cut: np.ndarray) -> np.ndarray:
        return np.asarray(activated) >= cut

    def coverage_table(self, activated: np.ndarray, targets: np.ndarray, conformity: np.ndarray) -> list[dict]:
        return conformal.class_coverage_table(activated, targets, conformity)

    def csv_columns(self, classes: list[str]) -> list[str]:
        return ["labels", *classes]

    def csv_cells(self, prediction: dict, classes: list[str], prefix: str = "") -> list[str]:
        probabilities = prediction[f"{prefix}probabilities"]
        return [" ".join(prediction[f"{prefix}labels"]), *(f"{probabilities[c]:.6f}" for c in classes)]

    def metrics(self, activated: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
        probabilities, truth = np.asarray(activated, np.float64), np.asarray(targets).astype(bool)
        predicted = self.decide(probabilities, thresholds).astype(bool)
        per_class_ap = {c: average_precision(truth[:, c], probabilities[:, c]) for c in range(truth.shape[1])}
        defined = [ap for ap in per_class_ap.values() if ap is not None]
        tp, fp, fn = (predicted & truth).sum(0), (predicted & ~truth).sum(0), (~predicted & truth).sum(0)
        f1 = [2 * t / (2 * t + p + n) if t + p + n else None for t, p, n in zip(tp, fp, fn)]
        micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()) if tp.sum() + fp.sum() + fn.sum() else 0.0
        return {
            "map": float(np.mean(defined)) if defined else 0.0,
            "micro_f1": float(micro),
            "macro_f1": float(np.mean([v for v in f1 if v is not None])) if any(v is not None for v in f1) else 0.0,
            "subset_accuracy": float((predicted == truth).all(1).mean()),
            "per_class_ap": per_class_ap,
        }


class Numeric(Task):
    """A number per image. The head regresses the target standardized on train (so one learning rate suits any
    scale); its outputs are in the target's own units once the head's scale is applied (Head)."""

    name, primary, output = "numeric", "r2", "values"

    def outputs(self, num_classes: int) -> int:
        return 1

    def loss(self, raw: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = F.mse_loss(raw, targets.reshape(raw.shape), reduction=reduction)
        return loss.reshape(-1) if reduction == "none" else loss

    def activation(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def residual(self, raw_t: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        error = raw_t.sub_(targets.reshape(1, -1))  # half the squared error: ridge regression's loss
        return 0.5 * error.square().sum().item(), error

    def decide(self, activated: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(activated).reshape(-1)

    def prediction(self, activated: np.ndarray, classes: list[str], thresholds=None, k: int = 1) -> dict:
        return {"value": float(np.asarray(activated).reshape(-1)[0])}

    def csv_columns(self, classes: list[str]) -> list[str]:
        return ["value"]

    def csv_cells(self, prediction: dict, classes: list[str], prefix: str = "") -> list[str]:
        return [f"{prediction[f'{prefix}value']:.6g}"]

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """Quintiles of the target: each fold spans its range."""
        values = np.asarray(targets, np.float64).reshape(-1)
        return np.searchsorted(np.quantile(values, [0.2, 0.4, 0.6, 0.8]), values, side="right")

    def metrics(self, activated: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
        predicted, truth = self.decide(activated).astype(np.float64), np.asarray(targets, np.float64).reshape(-1)
        error = predicted - truth
        spread = float(((truth - truth.mean()) ** 2).sum())
        return {
            "mae": float(np.abs(error).mean()),
            "rmse": float(np.sqrt((error**2).mean())),
            "r2": float(1 - (error**2).sum() / spread) if spread else 0.0,
        }


TASKS: dict[str, Task] = {task.name: task for task in (SingleLabel(), MultiLabel(), Numeric())}


def precision_recall(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's precision and recall with each distinct score taken as the cut (a score at or above it is a
    yes), highest first, ties together; and those scores."""
    truth = np.asarray(truth).astype(bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(scores)[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the end of each run of tied scores
    hits = np.cumsum(truth[order])[last]
    return hits / (last + 1), hits / max(1, truth.sum()), ranked[last]


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The area under one class's precision-recall steps (scikit-learn's average_precision_score: the precision at
    each positive, ranked by score, ties together); None when the class has no positive."""
    if not np.asarray(truth).any():
        return None
    precision, recall, _ = precision_recall(truth, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_thresholds(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per class, the probability cut with the best F1 on these (out-of-fold, training) rows: the midpoint between
    the cut's score and the next lower one, so that a slightly lower score on new images still counts; 0.5 for a
    class with no positive."""
    probabilities, truth = np.asarray(probabilities, np.float64), np.asarray(truth).astype(bool)
    cuts = np.full(probabilities.shape[1], 0.5)
    for c in range(probabilities.shape[1]):
        if not truth[:, c].any():
            continue
        precision, recall, scores = precision_recall(truth[:, c], probabilities[:, c])
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        best = int(np.argmax(f1))
        cuts[c] = (scores[best] + (scores[best + 1] if best + 1 < len(scores) else 0.0)) / 2
    return cuts
