"""Task kinds (stages/tasks.py): each owns its loss, activation, decision and metrics; checked against
scikit-learn's own figures, and a head trained end to end for each kind on real tensors."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, mean_absolute_error, r2_score

from stages.head import TensorRows, evaluate_head, train_head, train_heads
from stages.settings import TrainConfig
from stages.tasks import TASKS, average_precision, best_thresholds

FP32 = ("--precision", "fp32")  # the same features on every CPU (bf16 where it has AVX-512 BF16, otherwise)


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
    result = evaluate_head(head, valid)
    assert history[-1][task.primary] == pytest.approx(result[task.primary])
    assert result[task.primary] > {"single": 0.95, "multi": 0.95, "numeric": 0.9}[kind], result
    assert torch.isfinite(torch.tensor(result["loss"]))
    other = TrainConfig(head="linear", epochs=20, lr=1e-2, wd=1e-2, batch_size=64)
    together = train_heads(train, valid, [cfg, other], task.outputs(3), task=task)  # one product, one loss call
    for (stacked, _, _), alone in zip(together, (head, train_head(train, valid, other, task.outputs(3), task=task)[0])):
        assert torch.allclose(stacked.classifier.weight, alone.classifier.weight, atol=1e-5)


@pytest.mark.parametrize("kind", ["single", "multi", "numeric"])
def test_where_rows_are_plenty_every_task_kind_is_fitted_and_calibrated_on_a_held_out_share(kind):
    """The held-out protocol (stages.linear_probe) is the same engine for every kind: the L2 path scored on fold 0,
    the head fitted on the other folds, its temperature (and a multi-label head's thresholds) from its own outputs
    on fold 0; every stage of it on the task's loss."""
    from stages.calibration import image_folds
    from stages.linear_probe import train_logreg

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 16)) * 3
    tags = (rng.random((1200, 3)) < 0.5).astype(np.uint8)
    if kind == "single":
        tags = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 1200)]
    features = (tags @ centres + rng.normal(size=(1200, 16)) * 2).astype(np.float32)
    labels = {"single": tags.argmax(1), "multi": tags, "numeric": tags @ [1.0, -2.0, 0.5]}[kind]
    task = TASKS[kind]
    train, valid = TensorRows(features[:1000], labels[:1000]), TensorRows(features[1000:], labels[1000:])
    folds = image_folds([f"{i}.jpg" for i in range(1000)], task.strata(labels[:1000]), 8, seed=0)
    head, fit = train_logreg(train, folds, np.ones(1000, bool), 3, task=task, held_out=True)
    assert fit["cv_rows"] == (folds == 0).sum() and fit["l2"] in [row["l2"] for row in fit["path"]]
    result = evaluate_head(head, valid)
    assert result[task.primary] > {"single": 0.9, "multi": 0.9, "numeric": 0.9}[kind], result
    assert len(fit["out_of_fold_logits"]) == fit["cv_rows"]  # what the temperature was fitted on
    if kind == "multi":
        assert not np.allclose(head.decision_thresholds(), 0.5)  # chosen on the held-out share


@pytest.fixture
def tagged(tmp_path):
    """48 images of one or two shapes side by side (disk, stripe, check), in one flat folder: a tags table (the
    shapes each shows, space-separated) and a scores table (a number they add up to)."""
    from conftest import draw_example
    from PIL import Image

    rng = np.random.default_rng(0)
    kinds = {"check": "checkers", "disk": "disks", "stripe": "stripes"}
    flat = tmp_path / "flat"
    flat.mkdir()
    tags, scores = [], []
    for i in range(48):
        shown = sorted(set(rng.choice(list(kinds), size=int(rng.integers(1, 3)))))
        image = Image.new("RGB", (144, 72))
        for j, name in enumerate(shown * (2 // len(shown))):
            image.paste(draw_example(kinds[name], rng, (72, 72)), (72 * j, 0))
        image.save(flat / f"img_{i:03d}.jpg", quality=90)
        tags.append(f"img_{i:03d}.jpg,{' '.join(shown)}")
        scores.append(f"img_{i:03d}.jpg,{1.5 * ('disk' in shown) - 2 * ('stripe' in shown) + rng.normal() * 0.2:.3f}")
    (tmp_path / "tags.csv").write_text("path,label\n" + "\n".join(tags) + "\n")
    (tmp_path / "scores.csv").write_text("path,label\n" + "\n".join(scores) + "\n")
    return flat


@pytest.mark.slow
def test_multi_label_and_numeric_heads_from_featurize_to_evaluate(tagged, tmp_path):
    from conftest import one_line_error, run_cli, run_json

    store, tags, scores = tmp_path / "s.h5", tmp_path / "tags.csv", tmp_path / "scores.csv"
    done = run_json(
        "featurize", tagged, "--store", store, "--labels", tags, "--label-delim", " ", "--valid-pct", "0.25", *FP32
    )
    assert done["classes"] == ["check", "disk", "stripe"] and done["featurized"] == 48
    featurize = ("featurize", tagged, "--store", store, "--labels", tags, "--label-delim", " ", "--valid-pct", "0.25")
    assert run_json(*featurize, *FP32)["up_to_date"]
    edited = tags.read_text().replace(",check stripe\n", ",check\n", 1)  # one image's tags edited: no row changes,
    assert edited != tags.read_text()
    tags.write_text(edited)  # only the labelling the set records, which train-head then reads
    assert not run_json(*featurize, *FP32)["up_to_date"] and run_json(*featurize, *FP32)["up_to_date"]
    [run] = run_json("train-head", "--store", store, "--out", tmp_path / "tags")  # the table featurize recorded
    assert run["task"] == "multi" and run["accuracy"] is None and run["score"] > 0.9 and len(run["temperature"]) == 3
    metrics = json.loads((tmp_path / "tags" / "metrics.json").read_text())
    assert set(metrics["thresholds"]) == {"check", "disk", "stripe"} and metrics["valid"]["map"] == run["score"]
    evaluated = run_json("evaluate", tmp_path / "tags", "--store", store, "--out", tmp_path / "eval")
    assert evaluated["metrics"]["map"] == pytest.approx(run["score"]) and evaluated["images"] == 12
    coverage = evaluated["metrics"]["coverage"]  # per class, on the images carrying it
    assert [row["coverage"] for row in coverage] == [0.8, 0.9, 0.95] and coverage[0]["mean_size"] <= 3
    first = sorted(tagged.glob("*.jpg"))[0]
    [tagged_set] = run_json("predict", tmp_path / "tags", first, "--coverage", "0.9")["predictions"]
    assert set(tagged_set["set"]) <= {"check", "disk", "stripe"}
    assert (tmp_path / "eval" / "precision_recall.png").stat().st_size > 0
    images = sorted(tagged.glob("*.jpg"))[:4]
    predicted = run_json("predict", tmp_path / "tags", *images, "--out", tmp_path / "tags.csv.out.csv")
    rows = {r["path"]: r for r in predicted["predictions"]}
    given = dict(line.split(",") for line in tags.read_text().splitlines()[1:])
    for image in images:  # label sets with every class's probability, the head's thresholds deciding
        row = rows[str(image)]
        assert set(row["probabilities"]) == {"check", "disk", "stripe"}
        assert row["labels"] == [
            c for c in sorted(row["probabilities"]) if row["probabilities"][c] >= metrics["thresholds"][c]
        ]
    assert sum(rows[str(i)]["labels"] == given[i.name].split() for i in images) >= 3
    header = (tmp_path / "tags.csv.out.csv").read_text().splitlines()[0]
    assert header == "path,labels,check,disk,stripe,familiarity,unfamiliar,error"
    tuned = run_json(
        "finetune", tagged, "--head", tmp_path / "tags", "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "ft"
    )
    assert (
        tuned["task"] == "multi" and "map" in tuned["history"][0] and len(tuned["history"]) == 1
    )  # valid: the store's
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["head"]["task"] == "multi"
    grid = run_cli("train-head", "--store", store, "--head", "logreg,linear", "--out", tmp_path / "grid")
    assert " map " in grid.stdout.replace("┃", " ") and "logreg" in grid.stdout  # the leaderboard ranks by mAP
    found = run_json("lr-find", "--store", store, "--head", "linear", "--num-lrs", "5", "--out", tmp_path / "lr")
    assert found["task"] == "multi" and len(found["held_out_score"]) == len(found["lrs"]) and found["suggestion"] > 0
    # A number per image, on the same cache with no featurize: ridge regression, its L2 cross-validated
    [ridge] = run_json("train-head", "--store", store, "--labels", scores, "--out", tmp_path / "ridge")
    assert ridge["task"] == "numeric" and ridge["score"] > 0.5  # 36 training images
    evaluated = run_json("evaluate", tmp_path / "ridge", "--store", store, "--out", tmp_path / "eval-ridge")
    assert evaluated["metrics"]["r2"] == pytest.approx(ridge["score"], abs=1e-4)
    assert (tmp_path / "eval-ridge" / "predicted_vs_true.png").stat().st_size > 0
    [value] = run_json("predict", tmp_path / "ridge", images[0])["predictions"]
    assert set(value) == {"path", "value", "familiarity", "unfamiliar"} and isinstance(value["value"], float)
    listed = {r["run"]: r for r in run_json("runs", "--dir", tmp_path)}
    assert listed[str(tmp_path / "ridge")]["task"] == "numeric"
    assert listed[str(tmp_path / "ridge")]["score"] == pytest.approx(ridge["score"])
    assert listed[str(tmp_path / "tags")]["score"] == pytest.approx(run["score"])
    proc = run_cli("evaluate", tmp_path / "ridge", tagged, "--out", tmp_path / "e3", check=False)
    one_line_error(proc, "numeric head", "--store STORE")
    proc = run_cli(
        "train-head", "--store", store, "--labels", tags, "--task", "numeric", "--out", tmp_path / "x", check=False
    )
    one_line_error(proc, "--task numeric needs one number per image")


@pytest.mark.slow
def test_multi_label_audit_finds_planted_tag_errors_and_export_keeps_the_thresholds(tagged, tmp_path):
    from conftest import run_json

    store, tags = tmp_path / "s.h5", tmp_path / "tags.csv"
    run_json("featurize", tagged, "--store", store, "--labels", tags, "--label-delim", " ", *FP32)  # all train
    rows = [line.split(",") for line in tags.read_text().splitlines()[1:]]
    swap = {"check": "disk", "disk": "stripe", "stripe": "check"}
    planted = {rows[i][0] for i in (3, 11, 19, 27)}
    bad = [
        (p, " ".join(sorted(swap[t] for t in tagged_as.split())) if p in planted else tagged_as)
        for p, tagged_as in rows
    ]
    (tmp_path / "bad.csv").write_text("path,label\n" + "".join(f"{p},{t}\n" for p, t in bad))
    audited = run_json(
        "audit", "--store", store, "--labels", tmp_path / "bad.csv", "--label-delim", " ", "--out", tmp_path / "a"
    )
    found = {i["path"] for i in audited["label_issues"]}
    assert len(found & planted) >= 3 and len(found - planted) <= 2, audited["label_issues"]
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
    [run] = run_json("train-head", "--store", store, "--out", tmp_path / "head")
    exported = run_json("export", tmp_path / "head", "--out", tmp_path / "tags.onnx")
    assert exported["metadata"]["task"] == "multi" and exported["output"] == (
        "probabilities: float32 (N, 3); familiarity: float32 (N,)"
    )
    thresholds = json.loads(exported["metadata"]["thresholds"])
    saved = json.loads((tmp_path / "head" / "metrics.json").read_text())["thresholds"]
    assert thresholds == pytest.approx(saved)
    from bench.onnx_predict import crop

    session = ort.InferenceSession(str(tmp_path / "tags.onnx"))
    image = sorted(tagged.glob("*.jpg"))[0]
    [onnx_p] = session.run(None, {"images": crop(image, 256, 224)[None]})[0]
    [torch_p] = run_json("predict", tmp_path / "head", image, "--precision", "fp32")["predictions"]
    assert onnx_p == pytest.approx([torch_p["probabilities"][c] for c in ("check", "disk", "stripe")], abs=2e-3)


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_photos_side_by_side_train_multi_label_and_numeric_heads(tmp_path):
    """flowers5 photos composed one or two to a picture, tagged with the flowers they show and scored by their
    brightness (bench.labels.composite_photos): both heads learn them well above chance, end to end."""
    from conftest import run_json, shared_dataset

    from bench.labels import _write_table, composite_photos

    data, tags, scores = composite_photos(tmp_path, 200, 60, source=shared_dataset("flowers5"))
    _write_table(tmp_path / "tags.csv", tags)
    _write_table(tmp_path / "scores.csv", scores)
    store = tmp_path / "s.h5"
    run_json("featurize", data, "--store", store, "--labels", tmp_path / "tags.csv", "--label-delim", " ", *FP32)
    [run] = run_json("train-head", "--store", store, "--out", tmp_path / "tags")
    assert run["task"] == "multi" and run["score"] > 0.6  # mAP; five flowers, chance about 0.3
    evaluated = run_json("evaluate", tmp_path / "tags", "--store", store, "--out", tmp_path / "e")
    assert evaluated["metrics"]["map"] == pytest.approx(run["score"]) and evaluated["images"] == 60
    [ridge] = run_json("train-head", "--store", store, "--labels", tmp_path / "scores.csv", "--out", tmp_path / "r")
    assert ridge["task"] == "numeric" and ridge["score"] > 0.3  # R² of brightness
    [predicted] = run_json("predict", tmp_path / "r", data / "valid" / "00000.jpg")["predictions"]
    assert abs(predicted["value"] - scores["valid/00000.jpg"]) < 0.25
    audited = run_json("audit", "--store", store, "--out", tmp_path / "a")
    assert audited["labelled"] == 260 and isinstance(audited["label_issues"], list)
