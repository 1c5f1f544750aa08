"""Audit a labelled image set from its cached features: likely label errors, near-copies and leaks, outliers.

Label errors by confident learning (cleanlab) on out-of-sample probabilities of the logreg head; copies and
outliers from one blocked pass of cosine similarities, memory bounded whatever the number of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stages.calibration import image_folds
from stages.errors import PipelineError
from stages.head import TensorRows, raw_outputs
from stages.tasks import TASKS

# Raw cosine of pooled Lite0 features (measured, bench/results/audit.md): a copy re-encoded at JPEG quality 75 and
# resized to 0.9x keeps >= 0.94 to its original on dogscats photos; two different photos never exceeded 0.87.
NEAR_COPY_COSINE = 0.92
NEIGHBOURS = 5
CV_MAX_ROWS = 10_000  # the L2 strength is cross-validated on at most this many training rows (a seeded sample)
SIMILARITY_BLOCK_BYTES = 256 * 2**20  # one block of the similarity matrix: rows x all images, float32


@dataclass
class AuditRows:
    """The plain view of every image of a feature set: features, labels (-1 unlabelled), split, path, sha256; for a
    multi-label set its 0/1 row of classes too (`targets`; `labels` then holds each image's rarest class, what its
    folds are stratified and its map coloured by), for a numeric one its number."""

    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: list[str]
    sha256: list[str]
    targets: np.ndarray | None = None
    task: str = "single"

    def __len__(self) -> int:
        return len(self.labels)

    def label_name(self, row: int, classes: list[str]) -> str | None:
        """How a finding shows an image's label: its class, its classes space-separated, or its number."""
        if self.labels[row] < 0:
            return None
        if self.task == "multi":
            return " ".join(c for c, on in zip(classes, self.targets[row]) if on)
        if self.task == "numeric":
            return f"{self.targets[row]:g}"
        return classes[self.labels[row]]


def out_of_sample_probabilities(rows: AuditRows, num_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Per labelled row, class probabilities from a model that never saw it: k-fold logreg heads on train (the
    L2 strength cross-validated, the temperature fitted out of fold), one head on all of train for the rest (a
    softmax over the classes, or for a multi-label set a sigmoid per class)."""
    from stages.linear_probe import fold_logits, train_logreg

    task = TASKS[rows.task]
    train = np.flatnonzero((rows.splits == "train") & (rows.labels >= 0))
    other = np.flatnonzero((rows.splits != "train") & (rows.labels >= 0))
    targets = rows.targets if rows.task == "multi" else np.maximum(rows.labels, 0)
    every = TensorRows(torch.from_numpy(rows.features), targets)  # the stored rows, read in blocks where used
    split = every.select(train)
    fold = image_folds([rows.paths[i] for i in train], rows.labels[train], folds, seed)
    plain = np.ones(len(train), bool)
    head, fit = train_logreg(split, fold, plain, num_classes, seed=seed, cv_max_rows=CV_MAX_ROWS, task=task)
    logits = fit["out_of_fold_logits"]
    if fit["cv_rows"] < len(train):  # the strength came from a sample: every row's out-of-fold logits at it
        logits = fold_logits(split, fold, head, fit["l2"], task)
    probabilities = np.full((len(rows), num_classes), np.nan, np.float32)
    probabilities[train] = task.activation(logits / head.temperature).numpy()
    if len(other):
        probabilities[other] = task.activation(raw_outputs(head, every.select(other))[0] / head.temperature).numpy()
    return probabilities


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> list[tuple[int, int, float]]:
    """(row, suggested class, label quality) of the rows confident learning flags, most likely mislabeled first.

    Label quality is the out-of-sample probability of the given label (cleanlab's self-confidence): lower is
    more suspicious. Rows without a label (-1) are ignored.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labelled = np.flatnonzero(labels >= 0)
    given, probs = labels[labelled], probabilities[labelled]
    # n_jobs=1: in this process. cleanlab would otherwise fork a multiprocessing Pool after torch has started its
    # threads (a forked child can wait for ever on a lock another thread held) and its workers would inherit the
    # CLI's signal handlers; its results do not depend on n_jobs.
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    return [(int(labelled[i]), int(probs[i].argmax()), float(quality[i])) for i in ranked]


def multi_label_issues(
    labelled: np.ndarray, targets: np.ndarray, probabilities: np.ndarray
) -> list[tuple[int, np.ndarray, float]]:
    """(row, suggested 0/1 classes, label quality) of the labelled rows (indices) whose class sets cleanlab's
    multi-label confident learning flags, most likely wrong first; the suggestion is each class the out-of-sample
    probability gives even odds or better."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores

    given = [list(np.flatnonzero(t)) for t in targets[labelled]]
    probs = probabilities[labelled]
    ranked = find_label_issues(given, probs, multi_label=True, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(given, probs)
    return [(int(labelled[i]), (probs[i] >= 0.5).astype(np.uint8), float(quality[i])) for i in ranked]


def normalized(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows as float32 unit vectors (torch converts float16: several times faster than numpy)."""
    x = torch.as_tensor(features).float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


PAIRS_PER_GROUP = 10  # the most similar pairs listed for each group of copies (every member is listed once)


@dataclass
class CopyGroup:
    """Images that are copies or near-copies of one another (joined through pairs at or above the threshold):
    every member once, and the group's most similar pairs (i, j, cosine), best first, up to a cap."""

    members: list[int]
    pairs: list[tuple[int, int, float]]
    linked_pairs: int  # pairs at or above the threshold found in the group, listed or not


class CopyGroups:
    """Rows joined into groups by the pairs they are linked by (union-find over row indices), keeping each row's
    most similar pairs up to a cap: memory grows with rows and groups, never with the number of pairs (a thousand
    copies of one photo are half a million pairs)."""

    def __init__(self, n: int, pairs_per_group: int = PAIRS_PER_GROUP):
        self.parent = np.arange(n)
        self.cap = pairs_per_group
        self.best: list[tuple[int, int, float]] = []  # per linked row, its strongest pairs (at most cap)
        self.linked = np.zeros(n, np.int64)  # pairs each row was linked by, counted at its lower index

    def _roots(self, rows: np.ndarray) -> np.ndarray:
        roots = rows
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[rows] = roots  # path compression
        return roots

    def link(self, row: int, others: np.ndarray, similarity: np.ndarray) -> None:
        """Join `row` with `others` (each at cosine `similarity` to it, all above the threshold)."""
        if not len(others):
            return
        roots = np.unique(self._roots(np.r_[row, others]))
        self.parent[roots] = roots.min()
        self.linked[row] += len(others)
        top = np.argsort(-similarity)[: self.cap]
        self.best += [(min(row, int(j)), max(row, int(j)), float(s)) for j, s in zip(others[top], similarity[top])]

    def groups(self) -> list[CopyGroup]:
        """Groups of two or more rows, largest first; within one, members in row order and pairs best first."""
        roots = self._roots(np.arange(len(self.parent)))
        members: dict[int, list[int]] = {}
        for row in np.flatnonzero(roots != np.arange(len(roots))):
            members.setdefault(int(roots[row]), [int(roots[row])]).append(int(row))
        pairs: dict[int, dict[tuple[int, int], float]] = {}
        for a, b, similarity in self.best:
            kept = pairs.setdefault(int(roots[a]), {})
            kept[a, b] = max(similarity, kept.get((a, b), -1.0))
        found = []
        for root, rows in members.items():
            ranked = sorted(pairs.get(root, {}).items(), key=lambda item: (-item[1], item[0]))[: self.cap]
            found.append(
                CopyGroup(sorted(rows), [(a, b, s) for (a, b), s in ranked], int(self.linked[sorted(rows)].sum()))
            )
        return sorted(found, key=lambda g: (-len(g.members), g.members[0]))


ANN_MIN_ROWS = 50_000  # from here on an approximate index (faiss) finds the neighbours: the exact scan grows as
# the square of the rows (bench audit: 279 s at 1e5 rows, about 8 hours at 1e6)
ANN_CANDIDATES = 32  # neighbours the index proposes per row; each is then scored by its exact cosine
ANN_DIM = 128  # the index compares PCA-reduced vectors; the threshold is applied to the exact cosine
ANN_PROBES = 8  # inverted lists searched per query: at 1e5 rows 8 (and 4) found every pair 16 found (bench audit)
ANN_BLOCK_ROWS = 1024  # rows searched at a time (their candidates: 33 float32 rows each)
ANN_ADD_ROWS = 65536  # rows normalized and added to the index at a time


def similarity_scan(
    features: np.ndarray,
    threshold: float = NEAR_COPY_COSINE,
    neighbours: int = NEIGHBOURS,
    groups: CopyGroups | None = None,
) -> tuple[CopyGroups, np.ndarray, str]:
    """Near-copy pairs joined into copy groups, each row's mean cosine to its nearest neighbours, and how they were
    found: exactly below ANN_MIN_ROWS (or without faiss), through an approximate index from there on."""
    groups = groups if groups is not None else CopyGroups(len(features))
    if len(features) >= ANN_MIN_ROWS:
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            return (*approximate_scan(faiss, features, threshold, neighbours, groups), "approximate")
    return (*exact_scan(features, threshold, neighbours, groups=groups), "exact")


def approximate_scan(
    faiss, features: np.ndarray, threshold: float, neighbours: int, groups: CopyGroups
) -> tuple[CopyGroups, np.ndarray]:
    """As exact_scan, with the candidates of each row proposed by a faiss index (PCA to ANN_DIM dimensions, then
    an inverted file of about 2 sqrt(n) lists, ANN_PROBES searched) and scored by their exact cosine: a pair is
    missed only when the index does not propose it (bench audit measures how often)."""
    stored = torch.from_numpy(np.ascontiguousarray(features))  # the same memory: rows gathered from it by torch
    n, dim = stored.shape
    lists = int(min(4096, max(64, 2 * math.sqrt(n))))
    index = faiss.index_factory(dim, f"PCA{min(ANN_DIM, dim)},IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)
    index.train(normalized(stored[np.sort(sample)]).numpy())
    norms = torch.empty(n)  # rows are converted and normalized a block at a time: no float32 copy of them all
    for start in range(0, n, ANN_ADD_ROWS):
        block = stored[start : start + ANN_ADD_ROWS].to(torch.float32, copy=True)  # the caller's rows untouched
        norms[start : start + len(block)] = block.norm(dim=1).clamp_min_(1e-12)
        index.add(block.div_(norms[start : start + len(block), None]).numpy())
    faiss.extract_index_ivf(index).nprobe = ANN_PROBES
    k = min(n - 1, max(ANN_CANDIDATES, neighbours))
    nearest = np.zeros(n, np.float32)
    for start in range(0, n, ANN_BLOCK_ROWS):
        rows = np.arange(start, min(n, start + ANN_BLOCK_ROWS))
        x = stored[start : start + len(rows)].to(torch.float32, copy=True).div_(norms[start : start + len(rows), None])
        _, found = index.search(x.numpy(), k + 1)
        found = np.where(found == rows[:, None], -1, found)  # an image is not its own neighbour
        candidates = torch.from_numpy(np.maximum(found, 0).ravel())
        products = torch.bmm(stored.index_select(0, candidates).float().view(*found.shape, dim), x.unsqueeze(2))
        sim = products.squeeze(2).div_(norms[candidates].view(found.shape)).numpy()
        sim[found < 0] = -np.inf
        order = np.argsort(-sim, axis=1)
        sim, found = np.take_along_axis(sim, order, 1), np.take_along_axis(found, order, 1)
        top = np.where(np.isfinite(sim[:, :neighbours]), sim[:, :neighbours], np.nan)
        nearest[rows] = np.nan_to_num(np.nanmean(top, axis=1), nan=-1.0)
        close = (sim >= threshold) & (found > rows[:, None])  # each pair once, from its lower row
        for r in np.flatnonzero(close.any(1)):
            groups.link(int(rows[r]), found[r][close[r]], sim[r][close[r]])
    return groups, nearest


def exact_scan(
    features: np.ndarray,
    threshold: float = NEAR_COPY_COSINE,
    neighbours: int = NEIGHBOURS,
    block_bytes: int = SIMILARITY_BLOCK_BYTES,
    groups: CopyGroups | None = None,
) -> tuple[CopyGroups, np.ndarray]:
    """Every pair (i < j) with cosine >= threshold, joined into copy groups, and each row's mean cosine to its
    nearest neighbours.

    Rows are compared block by block against all others (one matrix product per block), so memory stays at
    block_bytes for any number of images; pairs are handed to the groups as they are found, never all kept.
    """
    x = normalized(features)
    n = len(x)
    k = min(neighbours, n - 1)
    block = max(1, min(n, block_bytes // (4 * max(1, n))))
    groups = groups if groups is not None else CopyGroups(n)
    nearest = np.zeros(n, np.float32)
    for start in range(0, n, block):
        sim = x[start : start + block] @ x.T
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -math.inf  # an image is not its own neighbour
        if k > 0:
            nearest[start : start + len(sim)] = sim.topk(k, dim=1).values.mean(1).numpy()
        later = torch.arange(n)[None, :] > (rows + start)[:, None]  # each pair once, from its lower row
        close = (sim >= threshold) & later
        for r in torch.nonzero(close.any(1)).flatten().tolist():
            others = torch.nonzero(close[r]).flatten()
            groups.link(start + r, others.numpy(), sim[r, others].numpy())
    return groups, nearest


def exact_copies(sha256: list[str], groups: CopyGroups) -> None:
    """Join rows whose source files have the same content hash (cosine 1 by definition)."""
    by_hash: dict[str, list[int]] = {}
    for row, digest in enumerate(sha256):
        by_hash.setdefault(digest, []).append(row)
    for rows in by_hash.values():
        for row, following in zip(rows, rows[1:]):  # each to the next: the whole set joins, pairs stay few
            groups.link(row, np.asarray([following]), np.ones(1, np.float32))


def outlier_rows(nearest: np.ndarray) -> tuple[np.ndarray, float]:
    """Rows far from every other image: kNN distance (1 - mean cosine to the nearest neighbours) beyond Tukey's
    far-out fence (third quartile + 3 x interquartile range). Returns the rows, farthest first, and the fence."""
    distance = 1 - nearest
    q1, q3 = np.quantile(distance, [0.25, 0.75])
    fence = float(q3 + 3 * (q3 - q1))
    rows = np.flatnonzero(distance > fence)
    return rows[np.argsort(-distance[rows])], fence


MAP_SAMPLE_ROWS = 100_000  # the map's axes come from at most this many rows (a seeded sample); every row is drawn


def feature_map(features: np.ndarray) -> np.ndarray:
    """A 2-D map of the features: their first two principal components (fitted on a sample past MAP_SAMPLE_ROWS,
    every row projected block by block: no float32 copy of a million rows)."""
    n = len(features)
    sample = (
        np.arange(n) if n <= MAP_SAMPLE_ROWS else np.sort(np.random.default_rng(0).choice(n, MAP_SAMPLE_ROWS, False))
    )
    x = torch.from_numpy(np.ascontiguousarray(features[sample], dtype=np.float32))
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=2, center=False, niter=4)
    points = np.empty((n, 2), np.float32)
    for start in range(0, n, 65536):
        block = torch.from_numpy(np.ascontiguousarray(features[start : start + 65536], dtype=np.float32))
        points[start : start + len(block)] = ((block - mean) @ v).numpy()
    return points


def check_auditable(rows: AuditRows, classes: list[str], where: str) -> None:
    """Refuse sets without labelled training images of two or more classes."""
    train = (rows.splits == "train") & (rows.labels >= 0)
    if len(rows) == 0:
        raise PipelineError(f"{where} holds no images; featurize a data folder into it first")
    if not train.any():
        raise PipelineError(f"{where} has no labelled train images; audit needs a train/ split of class folders")
    if rows.task != "single":  # classes of their own per image, or a number: no class need be present
        return
    present = np.unique(rows.labels[train])
    if len(classes) < 2 or len(present) < 2:
        raise PipelineError(f"{where} has {len(present)} class with train images; audit needs two or more")
    smallest = np.bincount(rows.labels[train], minlength=len(classes)).min()
    if smallest < 2:
        raise PipelineError(
            f"{where}: class {classes[int(np.argmin(np.bincount(rows.labels[train])))]} has "
            f"{smallest} train image; out-of-sample probabilities need two or more per class"
        )
