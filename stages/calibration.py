"""Honest probabilities: folds for out-of-fold predictions, temperature scaling, calibration error."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


def image_folds(paths, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold 0..k-1 of every row, stratified by class; all rows (views) of one image share a fold.

    Images are ordered by a hash of (seed, path) within each class and dealt round-robin, so the folds do not
    depend on row order and a file keeps its fold when others are added.
    """
    labels = np.asarray(labels)
    index: dict[str, int] = {}
    of_row = np.fromiter((index.setdefault(p, len(index)) for p in paths), np.int64, len(paths))
    first = np.unique(of_row, return_index=True)[1]  # each image's first row
    # The digest's first 8 bytes, big-endian, order images as the whole digest does (a tie is 2^-64 likely).
    keys = np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") for p in index), np.uint64
    )
    classes = labels[first]
    order = np.lexsort((keys, classes))  # by class, then by hash
    starts = np.searchsorted(classes[order], classes[order], side="left")  # where each image's class begins
    fold_of = np.empty(len(index), np.int64)
    fold_of[order] = (np.arange(len(index)) - starts) % k
    return fold_of[of_row]


def held_out_images(paths, labels: np.ndarray, pct: float, seed: int) -> np.ndarray:
    """Mask of the images held out for a temperature: about pct of each class (one fold of round(1/pct) of
    image_folds), so a rerun with the same seed holds out the same images."""
    if pct == 0 or not len(paths):
        return np.zeros(len(paths), dtype=bool)
    return image_folds(paths, labels, round(1 / pct), seed) == 0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that minimizes the log loss of softmax(logits / T) (Guo et al., 2017).

    Without a single mistake the loss falls for ever as T shrinks, which says nothing about new images: T stays 1.
    """
    logits, labels = logits.detach().float(), labels.long()
    if bool((logits.argmax(1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 can only mean an empty row, put in bin 0.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": n,
                "confidence": float(confidence[inside].mean()) if n else None,
                "accuracy": float(correct[inside].mean()) if n else None,
            }
        )
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    total = len(labels)
    return float(
        sum(
            r["count"] / total * abs(r["confidence"] - r["accuracy"])
            for r in reliability_bins(probabilities, labels, bins)
            if r["count"]
        )
    )
