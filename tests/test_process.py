"""Process-wide settings: made by the entry point (configure_process), never by importing or calling the library."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_images, run_cli_watching_children

from bench.synthetic import separable_features, write_feature_store
from pipeline.featurize import FeaturizeOptions, featurize
from pipeline.train_head import find_lr, load_cached_features, train_grid
from stages.settings import TrainConfig
from store.reader import FeatureStore


def test_importing_the_package_changes_nothing_and_configure_process_does_what_it_says():
    code = (
        "import os, sys; import pipeline; assert 'OMP_WAIT_POLICY' not in os.environ; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules; "
        "pipeline.configure_process(); assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'; "
        "import pipeline.plots; import matplotlib; assert matplotlib.get_backend() is not None; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_library_calls_take_threads_and_hand_the_process_back(tmp_path):
    torch.set_num_threads(1)
    seen = []
    store = write_feature_store(
        tmp_path / "s.h5",
        separable_features(60, classes=3, seed=0),
        separable_features(30, classes=3, seed=0),
        classes=("x", "y", "z"),
    )
    with FeatureStore(store) as fs:
        cached = load_cached_features(fs)
        train_grid(
            cached,
            [TrainConfig(head="linear", epochs=1)],
            tmp_path / "run",
            threads=2,
            on_epoch=lambda row: seen.append(torch.get_num_threads()),
        )
        assert seen == [2] and torch.get_num_threads() == 1
        find_lr(cached, TrainConfig(head="linear"), threads=2)
        assert torch.get_num_threads() == 1
    data = make_images(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    summary = featurize(FeaturizeOptions(data, tmp_path / "f.h5", precision="fp32", batch_size=4, threads=2))
    assert summary.featurized == 4 and torch.get_num_threads() == 1


@pytest.mark.slow
def test_no_command_starts_a_child_process(trained, tmp_path):
    """No fork after torch has started threads: every command works in its own process (cleanlab's confident
    learning included, which would fork a Pool by default), so no child can inherit a held lock or the CLI's
    signal handlers. Checked with an audit hook on every fork, spawn and subprocess of a real run."""
    data, store, head = trained
    commands = [
        ("featurize", data, "--store", tmp_path / "s.h5", "--batch-size", "8"),
        ("train-head", "--store", store, "--out", tmp_path / "head"),
        ("lr-find", "--store", store, "--out", tmp_path / "lr"),
        ("audit", "--store", store, "--out", tmp_path / "audit"),
        ("evaluate", head, data / "valid", "--out", tmp_path / "eval"),
        ("evaluate", head, data / "valid", "--store", store, "--out", tmp_path / "eval-store"),
        ("predict", head, data / "valid" / "a"),
        ("export", head, "--out", tmp_path / "model.onnx"),
        ("inspect", data, "--out", tmp_path / "inspect"),
        ("store", "info", store, "--verify"),
        ("runs", "--dir", tmp_path),
        ("finetune", data, "--head", head, "--out", tmp_path / "ft", "--epochs", "1", "--batch-size", "8"),
    ]
    for command in commands:
        _, children = run_cli_watching_children(*command)
        assert children == [], (command[0], children)
