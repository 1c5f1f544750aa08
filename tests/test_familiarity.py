"""Familiarity: a reference of training features and a threshold that held-out training images pass."""

import numpy as np
import pytest
import torch

from bench.synthetic import separable_features
from stages.familiarity import Familiarity, Separation, fit_familiarity, separation
from stages.head import TensorRows


def rows_of(features, labels):
    return TensorRows(torch.from_numpy(features), labels)


def test_the_threshold_passes_the_chosen_share_of_unseen_like_images_and_flags_unlike_ones():
    features, labels, _ = separable_features(5000, dim=32, classes=4, seed=0, dtype=np.float32, noise=3.0)
    unlike = separable_features(2000, dim=32, classes=4, seed=9, dtype=np.float32, noise=3.0)  # other centres
    familiarity = fit_familiarity(rows_of(features[:3000], labels[:3000]))
    fresh = features[3000:]  # the same kind, unseen
    passed = ~familiarity.unfamiliar(familiarity(torch.from_numpy(fresh)))
    assert 0.92 <= passed.mean() <= 0.98, passed.mean()
    assert familiarity.unfamiliar(familiarity(torch.from_numpy(unlike[0]))).mean() > 0.99
    scores = familiarity(torch.from_numpy(np.r_[fresh, unlike[0]])).numpy()
    assert separation(scores[:2000], scores[2000:]).auroc > 0.99


def test_every_training_image_in_the_reference_is_scored_without_itself():
    """Left one out: a reference image's own row (cosine 1) never counts as its neighbour, so the threshold sits
    where unseen images of the same kind fall, not at 1."""
    features, labels, _ = separable_features(1300, dim=16, classes=3, seed=1, dtype=np.float32, noise=3.0)
    fresh = features[300:]
    familiarity = fit_familiarity(rows_of(features[:300], labels[:300]))
    assert len(familiarity.reference) == 300 and familiarity.k == 3  # one neighbour per 100 images
    assert float(familiarity.threshold) < 0.999
    assert 0.85 <= (~familiarity.unfamiliar(familiarity(torch.from_numpy(fresh)))).mean() <= 0.99


def test_the_reference_is_bounded_and_survives_its_state_dict():
    train = separable_features(1000, dim=64, classes=2, seed=2, dtype=np.float16)
    familiarity = fit_familiarity(rows_of(train[0], train[1]), reference_bytes=200 * 64 * 2)
    assert familiarity.reference.shape == (200, 64) and familiarity.reference.dtype == torch.float16
    norms = familiarity.reference.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones(200), atol=1e-2)  # unit rows: cosine is a product
    again = Familiarity.from_state(familiarity.state_dict())
    x = torch.from_numpy(train[0][:50]).float()
    assert torch.equal(again(x), familiarity(x)) and float(again.threshold) == float(familiarity.threshold)
    assert again.summary() == familiarity.summary() and again.summary()["reference_images"] == 200


def test_separation_is_perfect_only_when_every_unlike_image_scores_lower():
    assert separation([0.9, 0.8, 0.7], [0.1, 0.2]) == Separation(auroc=1.0, fpr95=0.0)
    assert separation([0.5, 0.6], [0.55, 0.9]).auroc == pytest.approx(0.25)


def test_the_share_that_passes_is_chosen_and_kept():
    features, labels, _ = separable_features(3000, dim=16, classes=3, seed=4, dtype=np.float32, noise=3.0)
    rows = rows_of(features[:2000], labels[:2000])
    strict, lenient = fit_familiarity(rows, pass_share=0.8), fit_familiarity(rows, pass_share=0.99)
    assert float(lenient.threshold) < float(strict.threshold)
    fresh = torch.from_numpy(features[2000:])
    assert (~lenient.unfamiliar(lenient(fresh))).mean() > 0.95 > (~strict.unfamiliar(strict(fresh))).mean() > 0.7
    again = Familiarity.from_state(lenient.state_dict())
    assert again.summary()["pass_share"] == 0.99 and again.summary() == lenient.summary()
