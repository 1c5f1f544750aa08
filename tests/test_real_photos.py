"""On the real dogs-vs-cats photos (skipped when ../shared/data is absent): the features are right and useful."""

import json

import h5py
import pytest
import torch
from conftest import run_json, shared_dataset

from stages.backbones import create_backbone

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def load(store, split):
    with h5py.File(store, "r") as f:
        (name,) = list(f["sets"])
        g = f["sets"][name][split]
        return torch.tensor(g["features"][()], dtype=torch.float32), torch.tensor(g["labels"][()]).long()


def test_lite0_sees_imagenet_cats_and_dogs(dogscats_store):
    features, labels = load(dogscats_store[0], "valid")
    with torch.no_grad():
        top = create_backbone().model.classifier(features).argmax(1)
    cat = (top >= 281) & (top <= 285)
    dog = (top >= 151) & (top <= 268)
    agree = ((cat & (labels == 0)) | (dog & (labels == 1))).float().mean().item()
    assert agree > 0.85, agree


def test_logistic_regression_beats_the_2018_figure(dogscats_store):
    x, y = load(dogscats_store[0], "train")
    xv, yv = load(dogscats_store[0], "valid")
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    accuracy = (linear((xv - mean) / std).argmax(1) == yv).float().mean().item()
    assert accuracy >= 0.987, accuracy


def test_default_head_matches_a_converged_probe_and_is_calibrated(dogscats_store, tmp_path):
    """The default head (nothing chosen on valid) is as good as the best AdamW linear run, with honest probabilities."""
    store = dogscats_store[0]
    [head] = run_json("train-head", "--store", store, "--out", tmp_path / "head")
    grid = run_json(
        "train-head",
        "--store",
        store,
        "--head",
        "linear",
        "--lr",
        "3e-3,1e-2,3e-2",
        "--epochs",
        "3,10",
        "--no-calibrate",
        "--out",
        tmp_path / "grid",
    )
    assert head["head"] == "logreg" and head["accuracy"] >= 0.99
    assert head["accuracy"] >= grid[0]["accuracy"] - 0.002, (head, grid[0])
    metrics = run_json(
        "evaluate",
        tmp_path / "head",
        shared_dataset("dogscats") / "valid",
        "--store",
        store,
        "--out",
        tmp_path / "eval",
    )
    assert metrics["ece"] <= 0.02 and metrics["max_wrong_probability"] <= 0.999, metrics["ece"]


def test_rerun_decodes_nothing(dogscats_store):
    store, _ = dogscats_store
    again = run_json("featurize", shared_dataset("dogscats"), "--store", store)
    assert again["up_to_date"] and again["featurized"] == 0


def test_evaluate_from_photos_equals_evaluate_from_the_store(dogscats_store, tmp_path):
    store = dogscats_store[0]
    run_json("train-head", "--store", store, "--out", tmp_path / "head")
    valid = shared_dataset("dogscats") / "valid"
    raw = run_json("evaluate", tmp_path / "head", valid, "--out", tmp_path / "raw")
    cached = run_json("evaluate", tmp_path / "head", valid, "--store", store, "--out", tmp_path / "cached")
    assert raw["images"] == cached["images"] == 999
    assert abs(raw["accuracy"] - cached["accuracy"]) <= 1 / 999 and raw["accuracy"] >= 0.99


@pytest.mark.slow
def test_a_run_is_served_in_the_precision_its_metrics_were_measured_in(tmp_path):
    """Features in bf16 (it runs on any CPU, natively or not), a head, a one-epoch fine-tune: evaluate reproduces
    each run's own valid accuracy to the image, and predict's probabilities are evaluate's."""
    source = shared_dataset("flowers5")
    data = tmp_path / "flowers"
    for split, count in (("train", 12), ("valid", 10)):
        for folder in sorted((source / split).iterdir()):
            (data / split / folder.name).mkdir(parents=True)
            for photo in sorted(folder.iterdir())[:count]:
                (data / split / folder.name / photo.name).symlink_to(photo)
    run_json("featurize", data, "--store", tmp_path / "s.h5", "--precision", "bf16")
    run_json("train-head", "--store", tmp_path / "s.h5", "--out", tmp_path / "head")
    tuned = run_json("finetune", data, "--head", tmp_path / "head", "--epochs", "1", "--out", tmp_path / "ft")
    valid = data / "valid"
    for run, reported in (("head", None), ("ft", tuned["accuracy"])):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["precision"] == ("bf16" if run == "head" else tuned["precision"])
        if reported is None:
            reported = json.loads((tmp_path / run / "metrics.json").read_text())["accuracy"]
        evaluated = run_json("evaluate", tmp_path / run, valid, "--out", tmp_path / f"eval-{run}")
        assert evaluated["precision"] == config["precision"] and evaluated["precision_note"] is None
        assert round(evaluated["accuracy"] * 50) == round(reported * 50), run  # to the image, of 50
        predicted = run_json("predict", tmp_path / run, valid)["predictions"]
        by_path = {p["path"]: p["probability"] for p in predicted}
        confident = {t["path"]: t["probability"] for t in evaluated["top_losses"]}
        for path, probability in confident.items():
            assert by_path[path] == pytest.approx(probability, abs=1e-6), (run, path)
    other = "fp32" if config["precision"] == "bf16" else "bf16"
    overridden = run_json("predict", tmp_path / "ft", valid, "--precision", other)
    assert overridden["precision"] == other and overridden["precision_note"]
