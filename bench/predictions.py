"""Predictions a user can act on. Familiarity: the scores tried, on pairs of photo sets (a head trained on one, the
other's photos as images unlike its training images), beside the top probability; the product's own figures
(evaluate --ood); and what scoring costs beside the backbone's forward pass. Prediction sets: the coverage evaluate
measures on each set's valid images at each rate asked, with the mean set size.

Every score is computed from the cached features of both sets (the same backbone and preprocessing: the features a
model computes for those photos), against the valid images of the set the head was trained on.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import SHARED, Row, pipeline_cmd, run_json_command


def plain_features(store: Path, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from store import FeatureStore

    with FeatureStore(store) as opened:
        feature_set = opened.feature_set(None)
        parts = []
        for split in splits:
            plain = feature_set.column(split, "view") == 0
            parts.append((feature_set.features(split)[()][plain], feature_set.column(split, "labels")[plain]))
    return np.concatenate([p[0] for p in parts]).astype(np.float32), np.concatenate([p[1] for p in parts])


def mahalanobis(train: np.ndarray, labels: np.ndarray, ridge: float = 1e-3):
    """Class-conditional Mahalanobis distance on unit features with one shared covariance (Lee et al. 2018),
    negated: higher is more familiar."""
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in np.unique(labels)])
    centred = unit - means[np.searchsorted(np.unique(labels), labels)]
    precision = np.linalg.inv(centred.T @ centred / len(unit) + ridge * np.eye(unit.shape[1]))

    def score(x: np.ndarray) -> np.ndarray:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return -np.min([np.einsum("nd,de,ne->n", u - m, precision, u - m) for m in means], axis=0)

    return score


def scores_tried(run: Path, store: Path, unlike: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per score: (valid images' scores, unlike images' scores), higher meaning more like the training images."""
    from stages.familiarity import Familiarity, load_familiarity, unit
    from stages.head import load_head

    head, _ = load_head(run)
    train, labels = plain_features(store, ("train",))
    valid, _ = plain_features(store, ("valid",))
    with torch.no_grad():
        logits = [head(torch.from_numpy(x)) for x in (valid, unlike)]
    reference = unit(torch.from_numpy(train))
    tried = {
        "top probability (softmax)": tuple(t.softmax(1).max(1).values.numpy() for t in logits),
        "energy (logsumexp of the logits)": tuple(torch.logsumexp(t, 1).numpy() for t in logits),
    }
    for k in (1, 10, 50):
        knn = Familiarity(reference, 0.0, k)
        tried[f"cosine to the {k}-th nearest training image"] = tuple(
            knn(torch.from_numpy(x)).numpy() for x in (valid, unlike)
        )
    score = mahalanobis(train, labels)
    tried["Mahalanobis, class-conditional, unit features"] = (score(valid), score(unlike))
    product = load_familiarity(run)
    tried[f"the product: k-th nearest (k {product.k}, its reference)"] = tuple(
        product(torch.from_numpy(x)).numpy() for x in (valid, unlike)
    )
    return tried


def scoring_cost(run: Path, images: list[Path]) -> tuple[float, float, float, int]:
    """Seconds per image of the backbone's forward pass and of the familiarity score (its run's reference, and one
    of the largest reference the default allows), on decoded crops of real photos."""
    from stages.decode import ImageDecoder
    from stages.familiarity import REFERENCE_BYTES, Familiarity, unit
    from stages.model import image_items, load_model

    model = load_model(run, device="cpu")
    decoder = ImageDecoder(model.backbone.preprocessing, device="cpu", batch_size=32)
    batches = [b.images[:, 0] for b in decoder.decode(image_items(images))]
    largest = Familiarity(unit(torch.randn(REFERENCE_BYTES // (2 * 1280), 1280)), 0.0)
    timed = {"forward": 0.0, "familiarity": 0.0, "largest": 0.0}
    with torch.no_grad():
        for batch in batches:
            started = time.perf_counter()
            features = model.features(batch)
            timed["forward"] += time.perf_counter() - started
            for name, familiarity in (("familiarity", model.familiarity), ("largest", largest)):
                started = time.perf_counter()
                familiarity(features)
                timed[name] += time.perf_counter() - started
    n = sum(len(b) for b in batches)
    return timed["forward"] / n, timed["familiarity"] / n, timed["largest"] / n, len(largest.reference)


def prediction_rows(quick: bool) -> list[Row]:
    from stages.familiarity import REFERENCE_BYTES, separation

    names = [name for name in ("dogscats", "flowers5") if (SHARED / name).is_dir()]
    if quick or len(names) < 2:
        return []  # the pairs are real photo sets: ../shared/data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stores, runs = {}, {}
        for name in names:
            stores[name] = Path(tmp) / f"{name}.h5"
            run_json_command(pipeline_cmd("featurize", SHARED / name, "--store", stores[name]))
            runs[name] = Path(tmp) / f"{name}-head"
            run_json_command(pipeline_cmd("train-head", "--store", stores[name], "--out", runs[name]))
        for like, other in ((names[0], names[1]), (names[1], names[0])):
            unlike, _ = plain_features(stores[other], ("train", "valid"))
            tried = scores_tried(runs[like], stores[like], unlike)
            top = separation(*tried["top probability (softmax)"])
            for score, (a, b) in tried.items():
                found = separation(a, b)
                rows.append(
                    Row(
                        f"familiarity, {like} head against {len(unlike):,} {other} photos: AUROC of {score} vs "
                        "of the top probability",
                        found.auroc,
                        top.auroc,
                        "",
                        note=f"FPR95 {found.fpr95:.4f} vs {top.fpr95:.4f}",
                    )
                )
            report, _ = run_json_command(
                pipeline_cmd(
                    "evaluate",
                    runs[like],
                    "--store",
                    stores[like],
                    "--ood",
                    SHARED / other / "valid",
                    "--out",
                    Path(tmp) / f"{like}-eval",
                )
            )
            familiar, ood = report["familiarity"], report["familiarity"]["ood"]
            rows += [
                Row(
                    f"prediction sets, {like} valid: share holding the true class vs the coverage asked",
                    row["empirical"],
                    row["coverage"],
                    "share",
                    note=f"mean set size {row['mean_size']:.2f}; accuracy over the most confident 90%: "
                    f"{report['selective']['accuracy_at_90']:.4f} (all: {report['accuracy']:.4f})",
                )
                for row in report["coverage"]
            ]
            rows.append(
                Row(
                    f"evaluate --ood, {like} head against {ood['images']} {other} valid photos: unlike photos "
                    "given p >= 0.9 and not flagged",
                    ood["confident_unflagged"],
                    ood["confident"],
                    "share",
                    higher_is_better=False,
                    note=f"reference: given p >= 0.9 (flagged or not); familiarity AUROC {ood['familiarity']['auroc']}"
                    f", FPR95 {ood['familiarity']['fpr95']} (targets 0.99, 0.02); {familiar['unfamiliar_share']:.1%} "
                    f"of {like} valid flagged (threshold set for 5% of held-out training images)",
                )
            )
        images = sorted((SHARED / names[0] / "valid").rglob("*.jpg"))[:256]
        forward, familiarity, largest, reference_rows = scoring_cost(runs[names[0]], images)
        rows.append(
            Row(
                f"familiarity scoring per image vs the backbone's forward pass ({names[0]} head, {len(images)} photos)",
                familiarity * 1e3,
                forward * 1e3,
                "ms",
                higher_is_better=False,
                note=f"with the largest default reference ({reference_rows:,} images, {REFERENCE_BYTES >> 20} MB): "
                f"{largest * 1e3:.2f} ms ({largest / forward:.1%} of the forward pass; target under 10%)",
            )
        )
    return rows
