"""inspect, the model directory round trip, predict, evaluate and TTA, as users run them."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, imported_modules, make_images, one_line_error, run_cli, run_json
from PIL import Image

from stages.metrics import classification_metrics, top_losses


def valid_png(path, min_side=200):
    with Image.open(path) as png:
        assert png.format == "PNG" and min(png.size) >= min_side, (path, png.size)


def test_inspect_counts_sizes_problems_duplicates_and_a_leak(tmp_path):
    data = make_images(tmp_path / "d", {"train": {"a": 4, "b": 3}, "valid": {"a": 2, "b": 2}}, size=(80, 60))
    shutil.copy(data / "train/a/a_000.jpg", data / "valid/b/leaked.jpg")
    shutil.copy(data / "train/a/a_001.jpg", data / "train/b/copy.jpg")
    (data / "train/a/empty.jpg").write_bytes(b"")
    good = (data / "train/b/b_000.jpg").read_bytes()
    (data / "train/b/cut.jpg").write_bytes(good[: len(good) // 2])
    report = run_json("inspect", data, "--out", tmp_path / "out")
    assert report["splits"]["train"]["classes"] == {"a": 4, "b": 4}  # b: 3 + copy; empty and cut are unreadable
    assert report["splits"]["valid"]["images"] == 5 and report["splits"]["valid"]["balance"] == round(2 / 3, 3)
    assert report["width"] == {"min": 80, "median": 80, "max": 80} and report["formats"] == {"JPEG": 13}
    assert {u["path"] for u in report["unreadable"]} == {"train/a/empty.jpg", "train/b/cut.jpg"}
    groups = sorted(sorted(d["paths"]) for d in report["duplicates"])
    assert groups == [["train/a/a_000.jpg", "valid/b/leaked.jpg"], ["train/a/a_001.jpg", "train/b/copy.jpg"]]
    assert [sorted(d["paths"]) for d in report["leaks"]] == [["train/a/a_000.jpg", "valid/b/leaked.jpg"]]
    valid_png(report["contact_sheet"])
    text = run_cli("inspect", data, "--out", tmp_path / "out")
    assert "leak" in text.stderr and "empty.jpg" in text.stderr


def test_metrics_against_a_hand_computed_confusion_matrix():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 1, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), predicted] = 0.8
    m = classification_metrics(labels, probs, ["x", "y", "z"])
    assert m.confusion_matrix == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.per_class["x"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m.per_class["y"]["precision"] == pytest.approx(2 / 3) and m.per_class["y"]["recall"] == 1
    # z is never predicted: its precision is undefined, not 0; a class with no image has no recall either
    assert m.per_class["z"] == {"precision": None, "recall": 0.0, "f1": None, "support": 1}
    absent = classification_metrics(labels[:5], probs[:5], ["x", "y", "z"]).per_class["z"]
    assert absent == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m.log_loss == pytest.approx(-(4 * np.log(0.8) + 2 * np.log(0.1)) / 6)
    assert m.ece == pytest.approx(abs(0.8 - 4 / 6)) and m.max_wrong_probability == pytest.approx(0.8)
    assert m.most_confused[0]["count"] == 1 and len(m.most_confused) == 2
    assert top_losses(labels, probs, 2) == [1, 5] or set(top_losses(labels, probs, 2)) == {1, 5}


def test_load_model_predicts_what_the_head_says_on_cached_features(trained):
    import torch

    from pipeline import load_model
    from stages.head import load_head
    from store.reader import FeatureStore

    data, store, run = trained
    model = load_model(run)
    files = sorted((data / "valid").rglob("*.jpg"))
    predictions = {r["path"]: r for r in model.predict(files, top_k=3)}
    head, _ = load_head(run)
    with FeatureStore(store) as fs:
        s = fs.feature_set()
        cached = torch.softmax(head(torch.from_numpy(s.features("valid")[()]).float()), 1).detach().numpy()
        paths = s.column("valid", "paths")
    for path, expected in zip(paths, cached):
        got = predictions[str(data / path)]
        assert got["class"] == model.classes[int(expected.argmax())]
        assert got["probability"] == pytest.approx(float(expected.max()), abs=0.02)
        assert len(got["top_k"]) == 3


def test_the_readme_python_example_runs_as_written(trained, tmp_path):
    """The README's Python API example, verbatim: paths, PIL images and arrays give the same probabilities, and the
    cache's predictions are the run's own."""
    data, store, run = trained
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/head-a").symlink_to(run)
    (tmp_path / "runs/dogscats.h5").symlink_to(store)
    shutil.copy(data / "valid/a/a_000.jpg", tmp_path / "photo.jpg")
    snippet = re.search(r"<!-- python-api-snippet -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    (tmp_path / "example.py").write_text(snippet)
    proc = subprocess.run(
        [sys.executable, "example.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "(3, 3) ['a', 'b', 'c']" and "'set': [" in lines[1] and lines[2].startswith("(12, 3) ")


def test_images_in_memory_get_the_probabilities_of_their_files(trained):
    from PIL import Image

    from pipeline import get_preds, load_model

    data, store, run = trained
    model = load_model(run)
    files = sorted((data / "valid").rglob("*.jpg"))[:4]
    photos = [Image.open(f) for f in files]
    from_files = model.predict_proba(files)
    np.testing.assert_allclose(model.predict_proba(photos), from_files, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(np.stack([np.asarray(p) for p in photos])), from_files, atol=1e-5)
    assert np.isnan(model.predict_proba([files[0], data / "missing.jpg"])[1]).all()
    with pytest.raises(Exception, match="uint8 RGB"):
        model.predict_proba(np.zeros((2, 8, 8), np.float32))
    cached = get_preds(run, store)
    assert cached.probabilities.shape == (12, 3) and cached.classes == ["a", "b", "c"] and len(cached.paths) == 12
    assert set(cached.targets) == {0, 1, 2} and cached.familiarity.shape == (12,)


@pytest.mark.slow
def test_predict_mixed_inputs_and_a_broken_file(trained, tmp_path):
    data, _, run = trained
    (tmp_path / "broken.jpg").write_bytes(b"not really a jpeg")
    single = data / "valid/a/a_000.jpg"
    result = run_json(
        "predict", run, single, data / "valid/b", tmp_path / "broken.jpg", "--top-k", "2", "--out", tmp_path / "p.csv"
    )
    assert len(result["predictions"]) == 5 and result["errors"][0]["path"].endswith("broken.jpg")
    assert all({"familiarity", "unfamiliar"} <= set(r) for r in result["predictions"])
    with open(tmp_path / "p.csv") as f:
        every = list(csv.DictReader(f))
    assert len(every) == 6 and set(every[0]) >= {"path", "class", "probability", "a", "b", "c", "familiarity", "error"}
    broken = [r for r in every if r["path"].endswith("broken.jpg")]  # every input accounted for, with its reason
    assert len(broken) == 1 and broken[0]["error"].startswith("not an image") and broken[0]["class"] == ""
    rows = [r for r in every if not r["error"]]
    odd = os.path.join(os.fsdecode(tmp_path), os.fsdecode(b"\xff\xfe.jpg"))  # a name whose bytes are not UTF-8
    shutil.copy(single, odd)
    assert run_json("predict", run, odd, "--out", tmp_path / "odd.csv")["predictions"][0]["path"] == odd
    with open(tmp_path / "odd.csv", encoding="utf-8", errors="surrogateescape") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [odd]  # the file's own bytes: the path opens it
    assert all(abs(sum(float(r[c]) for c in "abc") - 1) < 1e-4 for r in rows)
    out = run_json("predict", run, data / "valid", "--tta", "--out", tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert len(saved) == 12 and {"tta_class", "tta_probabilities"} <= set(saved[0]) and out["errors"] == []
    text = run_cli("predict", run, single, tmp_path / "broken.jpg")
    assert "a_000.jpg" in text.stdout and "unreadable" in text.stderr and "familiarity" in text.stdout
    jpeg = single.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the decoder's own error lines stay unseen
    cut = run_cli("predict", run, single, tmp_path / "truncated.jpg")
    assert cut.stderr.splitlines() == [f"unreadable {tmp_path / 'truncated.jpg'}: cannot decode (corrupt or truncated)"]
    sets = run_json("predict", run, data / "valid", "--coverage", "0.95")["predictions"]
    assert all(set(r["set"]) <= {"a", "b", "c"} for r in sets) and sum(r["class"] in r["set"] for r in sets) >= 9
    one_line_error(run_cli("predict", run, single, "--coverage", "1.5", check=False), "--coverage")
    summary = run_cli("predict", run, single, tmp_path / "broken.jpg", "--out", tmp_path / "s.csv")
    assert "a_000.jpg" not in summary.stdout and "1 images" in summary.stdout  # the rows are in the file
    assert "1 file could not be read" in summary.stderr and "broken.jpg" not in summary.stderr
    assert "matplotlib" not in imported_modules("predict", run, single)  # it draws nothing: 0.6 s saved


def test_tta_changes_nothing_on_flip_and_shift_invariant_images(trained, tmp_path):
    from pipeline import load_model

    _, _, run = trained
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (120, 90), colour).save(tmp_path / f"solid{i}.png")
    model = load_model(run)
    files = sorted(tmp_path.glob("*.png"))
    for predictions, failed in model.predict_files(files, tta=True):
        assert not failed
        for p in predictions:
            np.testing.assert_allclose(p.tta_probabilities, p.probabilities, atol=1e-5)


@pytest.mark.slow
def test_evaluate_writes_plots_and_matches_the_store(trained, tmp_path):
    data, store, run = trained
    raw = run_json("evaluate", run, data / "valid", "--out", tmp_path / "raw")
    cached = run_json("evaluate", run, data / "valid", "--store", store, "--out", tmp_path / "cached")
    assert raw["images"] == cached["images"] == 12
    assert raw["accuracy"] == cached["accuracy"] and raw["confusion_matrix"] == cached["confusion_matrix"]
    assert raw["log_loss"] == pytest.approx(cached["log_loss"], abs=0.02)
    assert raw["ece"] == pytest.approx(cached["ece"], abs=0.02) and len(raw["reliability"]) == raw["ece_bins"] == 15
    assert sum(b["count"] for b in raw["reliability"]) == 12
    for key in ("confusion_png", "reliability_png", "top_losses_png"):
        valid_png(raw[key])
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["accuracy"] == raw["accuracy"]
    assert len(raw["top_losses"]) == 9
    tta = run_json("evaluate", run, data / "valid", "--tta", "--out", tmp_path / "tta")
    assert tta["tta"] and tta["images"] == 12
    assert [row["coverage"] for row in raw["coverage"]] == [0.8, 0.9, 0.95] and raw["selective"]["accuracy_at_90"]
    valid_png(raw["risk_coverage_png"])
    with open(raw["predictions_csv"]) as f:  # every evaluated image, as the run saw it
        evaluated = list(csv.DictReader(f))
    assert len(evaluated) == 12 and {"path", "true", "predicted", "probability", "familiarity", "set"} <= set(
        evaluated[0]
    )
    assert sum(r["true"] == r["predicted"] for r in evaluated) == round(raw["accuracy"] * 12)


@pytest.mark.slow
def test_evaluate_ood_separates_unlike_images_by_familiarity(trained, tmp_path):
    """Noise photos are unlike the generated shapes the head was trained on: familiarity flags them, and evaluate
    --ood reports how well it and the top probability tell them from the valid images."""
    data, store, run = trained
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(tmp_path / f"noise{i}.jpg")
    unlike = run_json("predict", run, tmp_path)["predictions"]
    assert sum(r["unfamiliar"] for r in unlike) >= 11
    report = run_json("evaluate", run, "--store", store, "--ood", tmp_path, "--out", tmp_path / "eval")
    ood = report["familiarity"]["ood"]
    assert ood["images"] == 12 and ood["familiarity"]["auroc"] >= 0.95 and ood["confident_unflagged"] <= 1 / 12
    assert set(ood) == {"folder", "images", "familiarity", "top_probability", "confident", "confident_unflagged"}
    assert set(ood["top_probability"]) == {"auroc", "fpr95"} and report["familiarity"]["pass_share"] == 0.95
    one_line_error(run_cli("evaluate", run, "--store", store, "--ood", tmp_path / "none", check=False), "--ood")


def test_class_names_must_match(trained, tmp_path):
    _, _, run = trained
    make_images(tmp_path / "split", {"": {"a": 1, "zebra": 1}})
    proc = run_cli("evaluate", run, tmp_path / "split", check=False)
    assert proc.returncode == 1 and "do not match the model's classes" in proc.stderr and "zebra" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_tampered_model_directory(trained, tmp_path):
    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "head.safetensors").write_bytes(b"garbage")
    proc = run_cli("predict", copy, tmp_path, check=False)
    assert proc.returncode == 1 and "is damaged" in proc.stderr
    (copy / "config.json").unlink()
    proc = run_cli("predict", copy, tmp_path, check=False)
    assert proc.returncode == 1 and "config.json is missing" in proc.stderr


@pytest.mark.slow
def test_demo_classifies_its_generated_images_without_a_confident_mistake(tmp_path):
    summary = run_json("demo", "--out", tmp_path / "demo")
    assert [run["accuracy"] for run in summary["heads"]] == [1.0, 1.0]
    assert {run["head"] for run in summary["heads"]} == {"logreg", "linear"}
    assert summary["evaluate"]["accuracy"] == 1.0 and summary["evaluate"]["ece"] < 0.02
    for p in summary["predictions"]:
        assert p["class"] in p["path"]


@pytest.mark.slow
def test_edited_or_damaged_config_is_named_not_mistaken(trained, tmp_path):
    _, _, run = trained
    config = json.loads((run / "config.json").read_text())
    assert len(config["checksum"]) == 64

    def predict_with(content, *fragments):
        copy = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run, copy)
        (copy / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        one_line_error(run_cli("predict", copy, tmp_path, check=False), str(copy / "config.json"), *fragments)

    swapped = {**config, "classes": config["classes"][::-1]}
    predict_with(swapped, "edited after training")
    predict_with(
        {**config, "feature_set": {**config["feature_set"], "backbone": "efficientnet_lite1"}}, "edited after training"
    )
    unsealed = {k: v for k, v in config.items() if k != "checksum"}
    predict_with({**unsealed, "classes": ["a", "b", "c", "d"]}, "names 4 classes but the head has 3 outputs")
    predict_with({**unsealed, "classes": ["a", "a", "b"]}, "distinct names")
    predict_with({**unsealed, "head": {"head": "linear"}}, "'head' must hold")
    predict_with("[]", "not an object")
    predict_with("{not json", "is damaged")
