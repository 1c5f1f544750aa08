"""Prediction sets with guaranteed coverage: split conformal prediction with adaptive prediction sets (APS, Romano,
Sesia and Candes 2020; the `aps` method of TorchCP, `include_last_label="randomized"` in MAPIE).

An image's set holds its classes from the most probable down: a class is in it when the probability mass of the
classes more probable than it, plus a share u of its own, stays within a threshold. The threshold is a quantile of
that same score for the true class of calibration images the head never fitted (out-of-fold or held-out training
images: never valid). If calibration and new images are exchangeable, the set holds the true class with probability
at least the coverage asked for, and at most 1/(n+1) more (n calibration images), whatever the model.

The share u is APS's randomization, without which a confident right answer (p 0.99, its whole mass) counts as
nonconforming and sets grow (flowers5 valid: 93 % coverage where 80 % was asked). Here u is drawn from a generator
seeded by the image's own probabilities, so an image always gets the same set. As in TorchCP and MAPIE a set may be
empty when less coverage is asked than the head's accuracy gives: naming no class is then how the sets reach the
rate asked, not more (always keeping the most probable class gave flowers5 86.7 % at 80 %, 92.5 % at 90 %; without,
79.7 % and 90.5 %). The class and probability of every prediction are given beside its set.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

COVERAGES = (0.8, 0.9, 0.95)  # evaluate's table


def _shares(probabilities: np.ndarray) -> np.ndarray:
    """Per image, APS's u in [0, 1): from a hash of its probabilities (to 6 decimals), the same on every call."""
    rounded = np.round(np.asarray(probabilities, np.float64), 6)
    digests = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rounded]
    return np.frombuffer(b"".join(digests), dtype="<u8") / 2.0**64


def _scores(probabilities: np.ndarray) -> np.ndarray:
    """(N, C): each class's score, the mass of the classes more probable than it plus a share u of its own."""
    probabilities = np.asarray(probabilities, np.float64)
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, 1)
    before = np.cumsum(ranked, axis=1) - ranked
    scores = np.empty_like(probabilities)
    np.put_along_axis(scores, order, before + _shares(probabilities)[:, None] * ranked, 1)
    return scores


def aps_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per calibration image, the score of its true class."""
    return _scores(probabilities)[np.arange(len(labels)), np.asarray(labels)]


def threshold(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n+1) coverage)-th smallest calibration score (infinite, every class, beyond the n scores)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage} is not between 0 and 1")
    scores = np.sort(np.asarray(scores))
    rank = math.ceil((len(scores) + 1) * coverage)
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def prediction_sets(probabilities: np.ndarray, cut: float) -> np.ndarray:
    """(N, C) booleans: the classes of each image's set at threshold `cut`."""
    return _scores(probabilities) <= cut


def coverage_table(probabilities: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Per coverage asked (COVERAGES): the share of images whose set holds their class, and the mean set size."""
    rows = []
    for coverage in COVERAGES:
        sets = prediction_sets(probabilities, threshold(scores, coverage))
        held = sets[np.arange(len(labels)), labels]
        rows.append({"coverage": coverage, "empirical": float(held.mean()), "mean_size": float(sets.sum(1).mean())})
    return rows


def risk_coverage(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective classification: answering only the most confident images first, the accuracy over the answered
    ones (y) at each share answered (x)."""
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities.max(1), kind="stable")
    right = (probabilities.argmax(1) == labels)[order]
    answered = np.arange(1, len(right) + 1)
    return answered / len(right), np.cumsum(right) / answered


def accuracy_at(shares: np.ndarray, accuracies: np.ndarray, share: float) -> float:
    """Accuracy over the most confident `share` of the images (the curve's point at or just past it)."""
    return float(accuracies[min(len(shares) - 1, int(np.searchsorted(shares, share - 1e-12)))])


def set_names(probabilities: np.ndarray, chosen: np.ndarray, classes: list[str]) -> list[str]:
    """One image's set as class names, the most probable first."""
    return [classes[i] for i in np.argsort(-np.asarray(probabilities), kind="stable") if chosen[i]]


# Multi-label: per class, the same promise for the images that carry it. A class is in an image's set when its
# probability reaches the class's threshold: a quantile of the probabilities its calibration images that carry it
# were given, so that a new image carrying it gets it in its set at least at the rate asked (class-conditional split
# conformal prediction on each class's positives).


def class_scores(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C, m): per class, the probabilities of its calibration images that carry it, sorted, NaN after the last."""
    probabilities, targets = np.asarray(probabilities, np.float32), np.asarray(targets).astype(bool)
    columns = [np.sort(probabilities[targets[:, c], c]) for c in range(targets.shape[1])]
    scores = np.full((len(columns), max(1, max(map(len, columns)))), np.nan, np.float32)
    for c, column in enumerate(columns):
        scores[c, : len(column)] = column
    return scores


def class_thresholds(scores: np.ndarray, coverage: float) -> np.ndarray:
    """Per class, the floor((n+1)(1 - coverage))-th smallest of its n positives' probabilities (0, every image,
    where n is too few to promise the rate)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage} is not between 0 and 1")
    cuts = np.zeros(len(scores), np.float64)
    for c, row in enumerate(scores):
        kept = row[~np.isnan(row)]
        rank = math.floor((len(kept) + 1) * (1 - coverage))
        cuts[c] = kept[rank - 1] if rank >= 1 else 0.0
    return cuts


def class_coverage_table(probabilities: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Per coverage asked: over the classes, the share of the images carrying a class whose set holds it (mean and
    lowest class), and the mean set size."""
    targets = np.asarray(targets).astype(bool)
    rows = []
    for coverage in COVERAGES:
        sets = np.asarray(probabilities) >= class_thresholds(scores, coverage)
        held = [sets[targets[:, c], c].mean() for c in range(targets.shape[1]) if targets[:, c].any()]
        rows.append(
            {
                "coverage": coverage,
                "empirical": float(np.mean(held)),
                "lowest_class": float(np.min(held)),
                "mean_size": float(sets.sum(1).mean()),
            }
        )
    return rows
