"""Heads on cached features: learning, schedules, determinism, streaming, grids, lr-find, compatibility, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.synthetic import separable_features, write_feature_store
from conftest import one_line_error, run_cli, run_json
from pipeline.train_head import check_compatible, load_cached_features
from stages.head import load_head
from stages.errors import PipelineError
from stages.head import TrainConfig, schedule_values, suggest_lr, train_head, smooth
from store.reader import FeatureStore


@pytest.fixture
def blob_store(tmp_path):
    train = separable_features(300, classes=3, seed=0, views=2)
    valid = separable_features(90, classes=3, seed=0)  # same centres: seed 0
    return write_feature_store(tmp_path / "blobs.h5", train, valid, classes=("x", "y", "z"), views=2)


def cached(store, max_memory="4G"):
    fs = FeatureStore(store)
    return load_cached_features(fs, max_memory=max_memory)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_each_head_learns_a_separable_problem(blob_store, head):
    data = cached(blob_store)
    model, history, steps = train_head(data.train_rows(0), data.valid, TrainConfig(head=head, epochs=4, lr=1e-2, batch_size=32), 3)
    assert history[-1]["accuracy"] > 0.95
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(steps) == 4 * int(np.ceil(300 / 32))
    assert torch.allclose(model.standardize.mean, data.train.memory[::3].float().mean(0), atol=1e-2)


def test_schedule_shapes():
    one = schedule_values("onecycle", 0.1, 100)
    peak = int(np.argmax(one))
    assert 20 <= peak <= 30 and abs(max(one) - 0.1) < 1e-3
    assert one[0] < 0.1 / 10 and one[-1] < 1e-4
    assert all(a <= b + 1e-12 for a, b in zip(one[:peak], one[1:peak + 1]))
    assert all(a >= b - 1e-12 for a, b in zip(one[peak:], one[peak + 1:]))
    cosine = schedule_values("cosine", 0.1, 100)
    assert cosine[0] == 0.1 and cosine[-1] < 1e-3 and all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert set(schedule_values("constant", 0.1, 10)) == {0.1}


def test_same_seed_same_numbers(blob_store):
    data = cached(blob_store)
    cfg = TrainConfig(head="mlp", epochs=2, lr=3e-3, seed=7)
    first = [{k: v for k, v in r.items() if k != "time"} for r in train_head(data.train_rows(0), data.valid, cfg, 3)[1]]
    again = [{k: v for k, v in r.items() if k != "time"} for r in train_head(data.train_rows(0), data.valid, cfg, 3)[1]]
    other = train_head(data.train_rows(0), data.valid, TrainConfig(head="mlp", epochs=2, lr=3e-3, seed=8), 3)[1]
    assert first == again and first[-1]["train_loss"] != other[-1]["train_loss"]


def test_streaming_equals_in_memory(blob_store):
    memory, stream = cached(blob_store, "4G"), cached(blob_store, "1K")
    assert memory.train.in_memory and not stream.train.in_memory
    cfg = TrainConfig(head="linear", epochs=2, lr=1e-2, views=2)
    a = train_head(memory.train_rows(2), memory.valid, cfg, 3)
    b = train_head(stream.train_rows(2), stream.valid, cfg, 3)
    assert a[2] == b[2]  # every step's loss
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))


def test_batches_visit_every_selected_row_once(blob_store):
    data = cached(blob_store, "1K")
    rows = data.train_rows(1)
    assert rows.num_rows == 600
    seen = torch.cat([y for _, y in rows.batches(37, np.random.default_rng(0))])
    assert len(seen) == 600 and sorted(seen.tolist()) == sorted(data.train.labels[torch.from_numpy(rows.rows)].tolist())


def test_lr_find_suggestions_lie_on_the_descending_part():
    lrs = list(np.logspace(-6, 1, 90))
    true_loss = [1 + (np.log10(lr) + 2) ** 2 / 10 if lr < 1e-2 else 1 + (np.log10(lr) + 2) ** 2 for lr in lrs]
    noisy = [v + 0.01 * np.sin(i) for i, v in enumerate(true_loss)]
    found = suggest_lr(lrs, smooth(noisy, beta=0.7))
    for key in ("steepest", "minimum_div10", "valley"):
        assert 1e-6 < found[key] < 1e-2, key
    assert 3e-3 < found["minimum"] < 3e-2


def test_cli_lr_find_and_auto(blob_store, tmp_path):
    result = run_json("lr-find", "--store", blob_store, "--out", tmp_path / "lr")
    assert result["lrs"][0] == pytest.approx(1e-7) and len(result["lrs"]) <= 100
    assert result["lrs"][0] < result["valley"] < result["lrs"][-1]
    with Image.open(result["plot"]) as png:
        assert png.format == "PNG" and png.size[0] >= 400
    board = run_json("train-head", "--store", blob_store, "--lr", "auto", "--out", tmp_path / "auto")
    assert board[0]["lr"] == pytest.approx(result["valley"]) and board[0]["accuracy"] > 0.9


def test_cli_grid_runs_every_combination_ranked_and_listed(blob_store, tmp_path):
    board = run_json("train-head", "--store", blob_store, "--head", "linear,mlp", "--lr", "1e-2,1e-6",
                     "--views", "0,2", "--epochs", "2", "--out", tmp_path / "grid")
    combos = {(r["head"], r["lr"], r["views"]) for r in board}
    assert len(board) == 8 and len(combos) == 8
    keys = [(-r["accuracy"], r["valid_loss"]) for r in board]
    assert keys == sorted(keys)
    assert board[-1]["lr"] == 1e-6
    best = board[0]["run"]
    config = json.loads(open(f"{best}/config.json").read())
    metrics = json.loads(open(f"{best}/metrics.json").read())
    assert config["feature_set"]["backbone"] == "efficientnet_lite0" and config["classes"] == ["x", "y", "z"]
    assert len(metrics["history"]) == 2 and set(metrics["per_class_accuracy"]) == {"x", "y", "z"}
    with Image.open(f"{best}/curves.png") as png:
        assert png.format == "PNG" and png.size[0] >= 400
    head, _ = load_head(best)
    assert head.num_classes == 3
    listed = run_json("runs", "--dir", tmp_path / "grid", "--store", blob_store)
    assert [r["run"] for r in listed] == [r["run"] for r in board]
    text = run_cli("train-head", "--store", blob_store, "--out", tmp_path / "one").stdout
    assert "epoch" in text and "train_loss" in text and "accuracy" in text


def test_config_refuses_features_of_another_backbone(blob_store, tmp_path):
    run_json("train-head", "--store", blob_store, "--out", tmp_path / "a")
    _, config = load_head(tmp_path / "a")
    other = write_feature_store(tmp_path / "other.h5", separable_features(10), backbone="resnet50")
    with FeatureStore(other) as fs:
        with pytest.raises(PipelineError, match="trained on features of efficientnet_lite0.*resnet50"):
            check_compatible(config, fs.feature_set(), tmp_path / "a")
    with FeatureStore(blob_store) as fs:
        check_compatible(config, fs.feature_set(), tmp_path / "a")


@pytest.mark.parametrize("args, message", [
    (("--lr", "-1"), "--lr -1.0 is out of range"),
    (("--head", "transformer"), "--head 'transformer' is not one of linear, mlp"),
    (("--views", "5"), "--views 5 is more than the store holds (2"),
    (("--lr", "fast"), "--lr 'fast' is not a comma-separated list"),
    (("--schedule", "step"), "--schedule 'step'"),
    (("--max-memory", "lots"), "--max-memory 'lots' is not a size"),
])
def test_bad_options_are_one_line_errors(blob_store, tmp_path, args, message):
    one_line_error(run_cli("train-head", "--store", blob_store, "--out", tmp_path / "x", *args, check=False), message)


def test_missing_store_is_a_clear_error(tmp_path):
    proc = run_cli("train-head", "--store", tmp_path / "none.h5", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "pipeline featurize" in proc.stderr
