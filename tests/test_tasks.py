"""Task kinds (stages/tasks.py): each owns its loss, activation, decision and metrics; checked against
scikit-learn's own figures, and a head trained end to end for each kind on real tensors."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, mean_absolute_error, r2_score

from stages.head import TensorRows, TrainConfig, evaluate_head, train_head
from stages.tasks import TASKS, average_precision, best_thresholds


def test_average_precision_is_scikit_learns_ties_included():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.random(60) < 0.3
        scores = np.round(rng.random(60), 1)  # many ties
        if truth.any():
            assert average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))
    assert average_precision(np.zeros(5, bool), np.arange(5)) is None


def test_thresholds_give_the_best_f1_each_class_can_have():
    rng = np.random.default_rng(1)
    truth = rng.random((200, 3)) < [0.1, 0.4, 0.0]
    probabilities = np.clip(truth * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    cuts = best_thresholds(probabilities, truth)
    for c in range(2):
        best = max(f1_score(truth[:, c], probabilities[:, c] >= t) for t in np.unique(probabilities[:, c]))
        assert f1_score(truth[:, c], probabilities[:, c] >= cuts[c]) == pytest.approx(best)
    assert cuts[2] == 0.5  # no positive: the default


def test_multi_label_and_numeric_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(2)
    truth = (rng.random((100, 4)) < 0.3).astype(np.uint8)
    probabilities = np.clip(truth * 0.5 + rng.random((100, 4)) * 0.5, 0, 1)
    got = TASKS["multi"].metrics(probabilities, truth)
    predicted = probabilities >= 0.5
    assert got["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert got["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert got["map"] == pytest.approx(average_precision_score(truth, probabilities, average="macro"))
    assert got["subset_accuracy"] == pytest.approx(float((predicted == truth).all(1).mean()))
    values, guesses = rng.normal(size=50), rng.normal(size=50)
    numeric = TASKS["numeric"].metrics(guesses.reshape(-1, 1), values)
    assert numeric["r2"] == pytest.approx(r2_score(values, guesses))
    assert numeric["mae"] == pytest.approx(mean_absolute_error(values, guesses))


@pytest.mark.parametrize("kind", ["single", "multi", "numeric"])
def test_a_head_trains_for_each_task_kind(kind):
    """Images tagged with any of three subjects (multi), scored by them (numeric), or showing one (single)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16)) * 3
    tags = (rng.random((600, 3)) < 0.5).astype(np.uint8)
    if kind == "single":
        tags = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 600)]
    features = (tags @ centres + rng.normal(size=(600, 16))).astype(np.float32)
    labels = {"single": tags.argmax(1), "multi": tags, "numeric": tags @ [1.0, -2.0, 0.5]}[kind]
    task = TASKS[kind]
    train, valid = TensorRows(features[:500], labels[:500]), TensorRows(features[500:], labels[500:])
    cfg = TrainConfig(head="linear", epochs=20, lr=3e-2, batch_size=64)
    head, history, _ = train_head(train, valid, cfg, task.outputs(3), task=task)
    result = evaluate_head(head, valid, task=task)
    assert history[-1][task.primary] == pytest.approx(result[task.primary])
    assert result[task.primary] > {"single": 0.95, "multi": 0.95, "numeric": 0.9}[kind], result
    assert torch.isfinite(torch.tensor(result["loss"]))
