"""Every command's --json is a public interface: its keys are pinned here (add keys, never rename or drop them)."""

import json

import pytest
from conftest import run_cli, run_json

pytestmark = pytest.mark.slow  # every test here runs the CLI

RUN_SETTINGS = {"run", "head", "lr", "wd", "epochs", "views", "accuracy", "valid_loss"}
FEATURIZE = {"featurized", "reused", "reused_by_content", "seconds", "images_per_second", "interrupted", "set", "store"}
FEATURIZE |= {"device"}
FEATURIZE |= {"precision", "backbone", "views", "merged", "up_to_date", "notes", "engine", "worker_peak_rss_mb"}
MERGED = FEATURIZE | {"data_dir", "images", "rows", "skipped", "classes", "store_bytes", "compaction"}
PAIR = {"a", "b", "split_a", "split_b", "similarity", "kind", "leak", "same_label"}


def keys(record) -> set:
    return set(record)


def test_featurize_store_info_and_runs(trained, tmp_path):
    data, store, _ = trained
    assert keys(run_json("featurize", data, "--store", tmp_path / "s.h5")) == MERGED
    assert keys(run_json("featurize", data, "--store", tmp_path / "s.h5")) == MERGED  # up to date: the same keys
    shard = run_json("featurize", data, "--store", tmp_path / "t.h5", "--num-shards", "2", "--shard-id", "1")
    assert keys(shard) == FEATURIZE | {"shard"}
    info = run_json("store", "info", store, "--verify")
    assert keys(info) == {"path", "size_bytes", "schema_version", "partitions", "sets", "verification"}
    assert {"name", "backbone", "arch", "weights_sha256", "preprocessing", "feature_dim", "views", "seed"} <= keys(
        info["sets"][0]
    )
    assert {"augmentation", "precision", "dtype", "classes", "splits", "data_dir", "layout"} <= keys(info["sets"][0])
    assert {"partitions", "live_rows", "dead_rows"} <= keys(info["sets"][0])
    assert keys(info["sets"][0]["splits"]["train"]) == {"rows", "images", "skipped"}
    piped = run_cli("store", "info", store, "--json").stdout  # into a pipe: one line, for the program reading it
    assert piped.count("\n") == 1 and keys(json.loads(piped)) == keys(info) - {"verification"}
    runs = run_json("runs", "--dir", store.parent)
    assert keys(runs[0]) == RUN_SETTINGS | {"kind", "backbone", "created", "l2", "labels", "task", "score"} | {
        "store",
        "set",
    }


def test_train_head_lr_find_evaluate_predict_export(trained, tmp_path):
    data, store, head = trained
    [run] = run_json("train-head", "--store", store, "--out", tmp_path / "head")
    assert keys(run) == RUN_SETTINGS | {"l2", "temperature", "seconds", "task", "score"}
    found = run_json("lr-find", "--store", store, "--out", tmp_path / "lr")
    assert keys(found) == {
        "lrs",
        "held_out_loss",
        "held_out_accuracy",
        "train_loss",
        "suggestion",
        "epochs",
        "held_out_rows",
        "plot",
        "task",
        "held_out_score",
    }
    metrics = run_json("evaluate", head, data / "valid", "--store", store, "--out", tmp_path / "eval")
    assert keys(metrics) == {
        "accuracy",
        "classes",
        "confusion_matrix",
        "confusion_png",
        "ece",
        "ece_bins",
        "from_store",
        "images",
        "log_loss",
        "max_wrong_probability",
        "metrics_json",
        "most_confused",
        "per_class",
        "reliability",
        "reliability_png",
        "run",
        "seconds",
        "split",
        "top_losses",
        "top_losses_png",
        "tta",
        "unreadable",
        "precision",
        "precision_note",
        "familiarity",
        "predictions_csv",
        "coverage",
        "selective",
        "risk_coverage_png",
    }
    assert keys(metrics["familiarity"]) == {
        "threshold",
        "neighbour",
        "reference_images",
        "pass_share",
        "unfamiliar",
        "unfamiliar_share",
        "ood",  # null without --ood
    }
    predicted = run_json("predict", head, data / "valid" / "a", "--tta")
    assert keys(predicted) == {
        "predictions",
        "errors",
        "seconds",
        "images_per_second",
        "out",
        "precision",
        "precision_note",
        "unfamiliar",
    }
    assert keys(predicted["predictions"][0]) == {
        "path",
        "class",
        "probability",
        "top_k",
        "probabilities",
        "tta_class",
        "tta_probability",
        "tta_top_k",
        "tta_probabilities",
        "familiarity",
        "unfamiliar",
    }
    exported = run_json("export", head, "--out", tmp_path / "model.pt", "--format", "torchscript")
    assert keys(exported) == {"out", "format", "bytes", "seconds", "input", "output", "classes", "metadata"} | {
        "precision",
        "precision_note",
    }


def test_audit_inspect_finetune(trained, tmp_path):
    data, store, head = trained
    result = run_json("audit", "--store", store, "--out", tmp_path / "audit")
    assert keys(result) == {
        "store",
        "set",
        "data_dir",
        "images",
        "labelled",
        "classes",
        "threshold",
        "outlier_fence",
        "label_issues",
        "duplicates",
        "copy_groups",
        "outliers",
        "leaks",
        "leak_groups",
        "similarity_search",
        "step_seconds",
        "notes",
        "seconds",
        "out",
        "files",
    }
    assert keys(result["files"]) == {
        "label_issues_csv",
        "duplicates_csv",
        "copy_groups_csv",
        "outliers_csv",
        "label_issues",
        "duplicates",
        "map",
    }
    report = run_json("inspect", data, "--out", tmp_path / "inspect")
    assert keys(report) == {
        "data_dir",
        "layout",
        "classes",
        "splits",
        "width",
        "height",
        "formats",
        "modes",
        "unreadable",
        "duplicates",
        "leaks",
        "contact_sheet",
        "notes",
    }
    tuned = run_json("finetune", data, "--head", head, "--out", tmp_path / "ft", "--epochs", "1", "--batch-size", "8")
    assert keys(tuned) == {
        "run",
        "processes",
        "history",
        "before",
        "kept_epoch",
        "temperature",
        "calibration_images",
        "accuracy",
        "valid_loss",
        "train_seconds",
        "train_images_per_second",
        "precision",
        "task",
        "score",
    }


def test_audit_findings_keep_their_keys(tmp_path):
    """A store with a planted exact copy and a label error: every kind of finding has records to pin."""
    import h5py

    from bench.synthetic import separable_features, write_feature_store

    store = write_feature_store(
        tmp_path / "s.h5", separable_features(60, dim=16, classes=2), separable_features(20, dim=16, classes=2, seed=1)
    )
    with h5py.File(store, "r+") as f:
        train = f["sets/efficientnet_lite0-test/train"]
        train["sha256"][1] = train["sha256"][0]  # an exact copy
        train["labels"][2] = 1 - train["labels"][2]  # a label error
        train["features"][3] = -train["features"][3]  # an outlier: pointing away from every other
    result = run_json("audit", "--store", store, "--out", tmp_path / "audit", "--pictures", "0")
    assert keys(result["label_issues"][0]) == {"path", "split", "given", "suggested", "score"}
    assert keys(result["duplicates"][0]) == PAIR
    assert keys(result["copy_groups"][0]) == {"count", "kind", "leak", "pairs", "members"}
    assert keys(result["copy_groups"][0]["members"][0]) == {"path", "split", "label"}
    assert keys(result["outliers"][0]) == {"path", "split", "label", "distance"}
