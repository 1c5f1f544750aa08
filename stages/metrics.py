"""Classification metrics from true labels and predicted probabilities."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stages.calibration import ECE_BINS, expected_calibration_error, reliability_bins


@dataclass
class ClassificationMetrics:
    """How a model did on labelled images: accuracy, log loss, calibration (ECE and its bins, the most confident
    mistake), per-class precision/recall/F1 (None where undefined), the confusion matrix, the most-confused pairs."""

    images: int
    accuracy: float
    log_loss: float
    ece: float
    ece_bins: int
    reliability: list[dict]
    max_wrong_probability: float | None
    per_class: dict[str, dict]
    confusion_matrix: list[list[int]]
    classes: list[str]
    most_confused: list[dict]

    def to_json(self) -> dict:
        return asdict(self)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> ClassificationMetrics:
    """Accuracy, log loss, calibration error (with its bins), per-class precision/recall/F1, the confusion matrix
    and the most-confused pairs."""
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(1)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        # Undefined (None) rather than 0: no image was predicted as the class, or none of it was present.
        precision = float(tp / confusion[:, i].sum()) if confusion[:, i].sum() else None
        recall = float(tp / confusion[i].sum()) if confusion[i].sum() else None
        f1 = (
            (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
            if precision is not None and recall is not None
            else None
        )
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(confusion[i].sum())}
    eps = 1e-15
    log_loss = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], eps, 1)).mean())
    pairs = [
        (classes[t], classes[p], int(confusion[t, p])) for t in range(k) for p in range(k) if t != p and confusion[t, p]
    ]
    pairs.sort(key=lambda x: -x[2])
    wrong = probabilities.max(1)[predicted != labels]
    return ClassificationMetrics(
        images=int(len(labels)),
        accuracy=float((predicted == labels).mean()),
        log_loss=log_loss,
        ece=expected_calibration_error(probabilities, labels),
        ece_bins=ECE_BINS,
        reliability=reliability_bins(probabilities, labels),
        max_wrong_probability=float(wrong.max()) if len(wrong) else None,
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
        classes=list(classes),
        most_confused=[{"true": t, "predicted": p, "count": c} for t, p, c in pairs],
    )


def top_losses(labels: np.ndarray, probabilities: np.ndarray, k: int = 9) -> list[int]:
    """Indices of the k images with the highest loss (the most confidently wrong first)."""
    loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1))
    return [int(i) for i in np.argsort(-loss)[:k]]
