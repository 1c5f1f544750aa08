"""Familiarity: how much an image looks like the images a model was trained on, from its backbone features.

The score is the cosine similarity of an image's features to those of its k-th nearest training image (deep nearest
neighbours, Sun et al. 2022; OpenOOD v1.5 ranks it among the best post-hoc scores): higher is more familiar. Measured
on the cached features (bench predictions): a dogscats head against flowers5 photos, AUROC 0.999 and FPR95 0.000
where the top probability gives 0.973 and 0.158; a flowers5 head against dogscats photos, 1.000 and 0.000 where the
top probability gives 0.47 (a flowers head is as sure of a cat as of a tulip). A class-conditional Mahalanobis
distance scored the same here but needs a D x D matrix and an inverse; the nearest neighbours need only rows.

Every model carries a reference: the unit-length features of its training images' plain views (a seeded sample of
at most REFERENCE_BYTES in float16), and a threshold under which an image is `unfamiliar`: the score that PASS_SHARE
of held-out training images reach (each reference image scored against the others, never against itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.errors import PipelineError

# The k-th nearest training image: 5, 10 and 50 scored alike on dogscats and flowers5 (1 a bit worse), but the k-th
# must still be an image of the same kind: with 8 generated images a class, noise photos against them scored AUROC
# 1.0 at k <= 5 and 0.58 at k = 10. So k grows with the reference, one per IMAGES_PER_NEIGHBOUR images, up to NEIGHBOUR.
NEIGHBOUR = 10
IMAGES_PER_NEIGHBOUR = 100
# The reference's size at most (float16 rows); larger training sets are sampled. Scoring is one product with it:
# with 26,214 rows (64 MB) it cost 17 % of a bf16 Lite0 forward pass per image, with 13,107 (32 MB) 6-9 %.
REFERENCE_BYTES = 32 << 20
PASS_SHARE = 0.95  # of in-distribution images, the share that passes as familiar
THRESHOLD_ROWS = 2048  # held-out training images the threshold is set from (its quantile known to about 1%)
SCORE_BLOCK_ROWS = 1024


class Familiarity(nn.Module):
    """Features (N, D) in, familiarity scores (N,) out; `unfamiliar` says which fall under the threshold."""

    def __init__(
        self, reference: torch.Tensor, threshold: float, neighbour: int = NEIGHBOUR, pass_share: float = PASS_SHARE
    ):
        super().__init__()
        self.register_buffer("reference", reference.to(torch.float16))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("neighbour", torch.tensor(int(neighbour)))
        self.register_buffer("pass_share", torch.tensor(float(pass_share)))
        self.k = min(int(neighbour), len(reference))  # a plain int: an exported graph's TopK takes a constant
        self._float32: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exported: the float16 rows, converted in-graph
            reference = self.reference.float()
        else:  # converted once, not per batch: at 26,000 rows the conversion cost as much as the product
            if self._float32 is None or self._float32.device != self.reference.device:
                self._float32 = self.reference.float()
            reference = self._float32
        similarity = (reference @ unit(features.float()).T).T  # this way round: 1.3x faster than features @ ref.T
        return similarity.topk(self.k, dim=1).values[:, -1]

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Familiarity:
        """Rebuilt from its state_dict (stages.rundir keeps it beside the head); a missing tensor is a KeyError."""
        share = float(state["pass_share"]) if "pass_share" in state else PASS_SHARE
        return cls(state["reference"], float(state["threshold"]), int(state["neighbour"]), share)

    def unfamiliar(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(scores) < float(self.threshold)

    def summary(self) -> dict:
        return {
            "threshold": round(float(self.threshold), 6),
            "neighbour": self.k,
            "reference_images": len(self.reference),
            "pass_share": round(float(self.pass_share), 6),
        }


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_familiarity(
    rows, seed: int = 0, pass_share: float = PASS_SHARE, reference_bytes: int = REFERENCE_BYTES
) -> Familiarity:
    """The reference and threshold of a model trained on `rows` (stages.head.Rows: the plain views of train)."""
    if rows.num_rows < 2:
        raise PipelineError("familiarity needs two or more training images")
    budget = max(2, reference_bytes // (2 * rows.dim))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows.num_rows, min(budget, rows.num_rows), replace=False))
    reference = torch.cat([x.clone() for x, _ in rows.select(rows.rows[chosen]).whole_pass()])
    others = np.setdiff1d(np.arange(rows.num_rows), chosen)
    if len(others):  # images outside the reference: held out as they are
        held = np.sort(rng.choice(others, min(THRESHOLD_ROWS, len(others)), replace=False))
        held_rows = torch.cat([x.clone() for x, _ in rows.select(rows.rows[held]).whole_pass()])
        return familiarity_of(reference, held_rows, pass_share)
    # every image in it: each scored against the others (its own row left out)
    familiarity = familiarity_of(reference, None)
    held = np.sort(rng.choice(len(reference), min(THRESHOLD_ROWS, len(reference)), replace=False))
    scores = _left_out_scores(familiarity.reference.float(), held, familiarity.k)
    threshold = float(np.quantile(scores.numpy(), 1 - pass_share))
    return Familiarity(familiarity.reference, threshold, familiarity.k, pass_share)


def familiarity_of(reference: torch.Tensor, held: torch.Tensor | None, pass_share: float = PASS_SHARE) -> Familiarity:
    """A reference of training features, and the threshold `pass_share` of the held-out images' features reach
    (none given: threshold 0, for the caller to set)."""
    k = min(NEIGHBOUR, max(1, len(reference) // IMAGES_PER_NEIGHBOUR))
    familiarity = Familiarity(unit(reference.float()).half(), 0.0, k)
    if held is None or not len(held):
        return familiarity
    scores = torch.cat([familiarity(held[i : i + SCORE_BLOCK_ROWS]) for i in range(0, len(held), SCORE_BLOCK_ROWS)])
    return Familiarity(familiarity.reference, float(np.quantile(scores.numpy(), 1 - pass_share)), k, pass_share)


def _left_out_scores(reference: torch.Tensor, held: np.ndarray, k: int) -> torch.Tensor:
    """The score of each held reference row against the other rows: its k-th nearest, itself excluded."""
    scores = []
    for i in range(0, len(held), SCORE_BLOCK_ROWS):
        rows = torch.from_numpy(held[i : i + SCORE_BLOCK_ROWS])
        similarity = reference[rows] @ reference.T
        similarity[torch.arange(len(rows)), rows] = -torch.inf
        scores.append(similarity.topk(min(k, len(reference) - 1), dim=1).values[:, -1])
    return torch.cat(scores)


def load_familiarity(run_dir) -> Familiarity | None:
    """A run's familiarity, or None for a run written before models carried one."""
    from safetensors import SafetensorError

    from stages.rundir import FAMILIARITY, read_weights

    path = Path(run_dir) / FAMILIARITY
    if not path.is_file():
        return None
    try:
        return Familiarity.from_state(read_weights(path))
    except (KeyError, ValueError, SafetensorError) as exc:
        raise PipelineError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); train the head again"
        ) from None


@dataclass(frozen=True)
class Separation:
    """How well a score (higher: more like the training images) tells images like them from others: the area under
    the ROC curve, and the share of the others that pass where 95% of the like images do (FPR95)."""

    auroc: float
    fpr95: float


def separation(like: np.ndarray, unlike: np.ndarray) -> Separation:
    from sklearn.metrics import roc_auc_score

    like, unlike = np.asarray(like, np.float64), np.asarray(unlike, np.float64)
    auroc = roc_auc_score(np.r_[np.ones(len(like)), np.zeros(len(unlike))], np.r_[like, unlike])
    return Separation(round(float(auroc), 4), round(float((unlike >= np.quantile(like, 0.05)).mean()), 4))
