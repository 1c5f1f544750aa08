"""Prediction sets: split conformal APS reaches the coverage asked for on exchangeable images, no more."""

import math

import numpy as np
import pytest
import torch

from stages.conformal import (
    aps_scores,
    class_coverage_table,
    class_scores,
    class_thresholds,
    coverage_table,
    prediction_sets,
    risk_coverage,
    set_names,
    threshold,
)
from stages.head import Head, settle


def draws(n: int, classes: int, seed: int):
    """Images of a noisy 5-class model: probabilities from a softmax of noisy logits, labels drawn from them (so
    the probabilities are honest, as a calibrated head's are)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(n, classes))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return p, labels


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_hold_the_true_class_at_the_rate_asked(coverage):
    calibration, truth = draws(4000, 5, 0)
    fresh, labels = draws(20000, 5, 1)
    sets = prediction_sets(fresh, threshold(aps_scores(calibration, truth), coverage))
    held = sets[np.arange(len(labels)), labels].mean()
    assert coverage - 0.015 <= held <= coverage + 0.015, held  # at least the rate, and not much more
    assert sets.sum(1).mean() < 5  # adaptive: not every class everywhere


def test_sets_are_the_same_for_the_same_image_and_grow_with_coverage():
    p, labels = draws(500, 5, 2)
    scores = aps_scores(p, labels)
    assert np.array_equal(prediction_sets(p, 0.7), prediction_sets(p.copy(), 0.7))  # u is the image's own
    smaller, larger = prediction_sets(p, threshold(scores, 0.8)), prediction_sets(p, threshold(scores, 0.95))
    assert (larger >= smaller).all() and larger.sum() > smaller.sum()
    assert threshold(scores[:5], 0.9) == math.inf  # 5 calibration images cannot promise 90%: every class
    assert set_names(np.array([0.1, 0.6, 0.3]), np.array([True, True, False]), ["a", "b", "c"]) == ["b", "a"]
    table = coverage_table(p, labels, scores)
    assert [row["coverage"] for row in table] == [0.8, 0.9, 0.95]


def test_a_calibrated_head_keeps_its_conformity_scores_and_an_old_one_says_what_to_do():
    head = Head("logreg", 4, 3)
    raw, targets = torch.randn(200, 3) * 3, torch.randint(0, 3, (200,))
    settle(head, raw, targets)
    assert len(head.conformity) == 200 and torch.all(head.conformity[1:] >= head.conformity[:-1])
    again = Head.from_spec(head.spec())
    again.load_state_dict(head.state_dict())
    assert torch.equal(again.conformity, head.conformity) and "conformity" not in head.spec().to_json()
    p = torch.softmax(raw / head.temperature, 1).numpy()
    assert head.prediction_sets(p, 0.9).shape == (200, 3)
    with pytest.raises(Exception, match="--coverage needs a single- or multi-label head trained with calibration"):
        Head("logreg", 4, 3).prediction_sets(p, 0.9)


def test_risk_coverage_answers_the_most_confident_first():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.55, 0.45]])
    shares, accuracies = risk_coverage(p, np.array([0, 1, 0, 1]))
    assert list(shares) == [0.25, 0.5, 0.75, 1.0] and list(accuracies) == [1.0, 1.0, 2 / 3, 0.5]


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_a_multi_label_set_holds_each_class_an_image_carries_at_the_rate_asked(coverage):
    """Per class, on the images that carry it: class-conditional split conformal on each class's positives."""
    rng = np.random.default_rng(3)

    def tagged(n):  # 4 classes of different prevalence, honest sigmoid probabilities
        p = 1 / (1 + np.exp(-rng.normal([-1, 0, 1, -2], 2, size=(n, 4))))
        return p, (rng.random((n, 4)) < p).astype(np.uint8)

    calibration, truth = tagged(20000)
    fresh, targets = tagged(30000)
    scores = class_scores(calibration, truth)
    assert scores.shape[0] == 4 and np.isnan(scores).any()  # classes carried by fewer images: padded
    sets = fresh >= class_thresholds(scores, coverage)
    for c in range(4):
        held = sets[targets[:, c] == 1, c].mean()
        assert coverage - 0.02 <= held <= coverage + 0.02, (c, held)
    table = class_coverage_table(fresh, targets, scores)[[0.8, 0.9, 0.95].index(coverage)]
    assert abs(table["empirical"] - coverage) < 0.02 and table["lowest_class"] >= coverage - 0.02
    few = class_scores(calibration[:3], np.ones((3, 4), np.uint8))  # 3 positives cannot promise 80%
    assert (class_thresholds(few, coverage) == 0).all()
