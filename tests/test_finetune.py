"""Fine-tuning on a real but tiny timm model: two paths agree, learning rates, unfreezing, frozen BN, resume."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, make_images, run_json

from bench.harness import torchrun_cmd
from stages.calibration import held_out_images
from stages.decode import ImageDecoder
from stages.errors import PipelineError
from stages.finetune import Finetuner, group_learning_rates, read_checkpoint
from stages.head import load_head
from stages.model import backbone_for
from stages.settings import FinetuneConfig

ARCH = "test_efficientnet"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Generated images, a tiny timm backbone's weights, a store featurized with them, and a head: (data, head_dir)."""
    root = tmp_path_factory.mktemp("ft")
    data = make_images(root / "data", {"train": {"a": 6, "b": 6}, "valid": {"a": 3, "b": 3}})
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(timm.create_model(ARCH, pretrained=False).state_dict(), weights)
    run_json("featurize", data, "--store", root / "s.h5", "--weights", weights, "--arch", ARCH, "--precision", "fp32")
    run_json(
        "train-head",
        "--store",
        root / "s.h5",
        "--head",
        "mlp",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--out",
        root / "head",
    )
    return data, root / "head"


def tuner(tiny, out, **overrides):
    data, head_dir = tiny
    head, config = load_head(head_dir)
    backbone = backbone_for(config.feature_set, head_dir)
    cfg = FinetuneConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, **overrides})
    return Finetuner(backbone, head, cfg, "cpu", out)


def split(data, name):
    files = sorted(str(p) for p in (data / name).rglob("*.jpg"))
    return files, np.asarray([0 if "/a/" in f else 1 for f in files])


def test_full_model_equals_head_on_cached_features(tiny, tmp_path):
    from store.reader import FeatureStore

    data, head_dir = tiny
    t = tuner(tiny, tmp_path)
    t.model.eval()
    files, _ = split(data, "valid")
    decoder = ImageDecoder(t.preprocessing, batch_size=4)
    with torch.no_grad():
        full = torch.cat(
            [
                torch.softmax(t.model(b.images[:, 0]), 1)
                for b in decoder.decode((f, (lambda f=f: np.fromfile(f, np.uint8))) for f in files)
            ]
        )
        head, config = load_head(head_dir)
        with FeatureStore(config.feature_set.store) as fs:
            cached = torch.softmax(head(torch.from_numpy(fs.feature_set().features("valid")[()]).float()), 1)
    torch.testing.assert_close(full, cached, atol=2e-3, rtol=0)


def test_learning_rate_of_each_group(tiny, tmp_path):
    assert group_learning_rates(1e-3, 100) == pytest.approx([1e-5, 1e-4, 1e-3])
    t = tuner(tiny, tmp_path, lr=2e-3, lr_mult=10)
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([2e-4, 2e-3 / 10**0.5, 2e-3])
    sizes = [len(g["params"]) for g in t.optimizer.param_groups]
    assert sizes[0] > 0 and sizes[1] > 0 and sizes[2] == len(list(t.model.head.parameters()))


@pytest.mark.parametrize(
    "unfreeze, trained_by_epoch",
    [
        ("gradual", [[False, False, True], [False, True, True], [True, True, True]]),
        ("late", [[False, True, True]] * 3),
        ("all", [[True, True, True]] * 3),
    ],
)
def test_unfreezing_decides_which_parameters_get_gradients(tiny, tmp_path, unfreeze, trained_by_epoch):
    t = tuner(tiny, tmp_path, unfreeze=unfreeze)
    x = torch.rand(2, 3, 160, 160) * 2 - 1
    for epoch, trained in enumerate(trained_by_epoch):
        t._train_mode(epoch)
        t.optimizer.zero_grad(set_to_none=True)
        t.model(x).sum().backward()
        got = [all(p.grad is not None for p in group) for group in t.groups]
        assert got == trained, epoch
        assert [any(p.grad is not None for p in group) for group in t.groups] == trained


def bn_stats(model):
    return [m.running_mean.clone() for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_statistics_frozen_unless_asked(tiny, tmp_path, train_bn):
    data, _ = tiny
    t = tuner(tiny, tmp_path, epochs=1, train_bn=train_bn)
    before = bn_stats(t.model)
    t.fit(split(data, "train"), None)
    changed = any(not torch.equal(a, b) for a, b in zip(before, bn_stats(t.model)))
    assert changed == train_bn


class Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(tiny, tmp_path, where):
    data, _ = tiny
    train, valid = split(data, "train"), split(data, "valid")
    whole = tuner(tiny, tmp_path / "whole")
    whole.fit(train, valid)

    stopped = tuner(tiny, tmp_path / "stopped")

    def stop_at_epoch(row):
        raise KeyboardInterrupt

    def stop_mid_epoch(step, total):
        if stopped.epoch == 1 and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        if where == "epoch end":
            stopped.fit(train, valid, on_epoch=stop_at_epoch)
        else:
            stopped.fit(train, valid, on_step=stop_mid_epoch)
    state = read_checkpoint(tmp_path / "stopped")
    assert (state["epoch"], state["step"]) == ((1, 0) if where == "epoch end" else (1, 2))
    resumed = tuner(tiny, tmp_path / "stopped")
    resumed.restore(state, steps_per_epoch=3)
    resumed.fit(train, valid)
    assert [r["train_loss"] for r in resumed.history] == pytest.approx([r["train_loss"] for r in whole.history])
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_cli_finetune_then_predict_and_featurize_again(tiny, tmp_path):
    data, head_dir = tiny
    result = run_json(
        "finetune", data, "--head", head_dir, "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "ft"
    )
    assert result["before"]["accuracy"] is not None and len(result["history"]) == 1
    # One image per class held out (one fold of ten, dealt per class): a fine-tuned epoch's temperature is fitted
    # on them; the head as given, when kept, keeps its own cross-validated one.
    familiar = json.loads((tmp_path / "ft" / "metrics.json").read_text())["familiarity"]
    if result["kept_epoch"] == -1:
        assert result["calibration_images"] == 0
        assert result["temperature"] == pytest.approx(float(load_head(head_dir)[0].temperature))
        assert familiar == json.loads((head_dir / "metrics.json").read_text())["familiarity"]  # the head's own
    else:
        assert result["calibration_images"] == 2 and result["temperature"] != 1.0
    for name in (
        "backbone.safetensors",
        "head.safetensors",
        "config.json",
        "metrics.json",
        "curves.png",
        "checkpoint.pt",
    ):
        assert (tmp_path / "ft" / name).exists(), name
    predictions = run_json("predict", tmp_path / "ft", data / "valid")["predictions"]
    assert len(predictions) == 6
    again = run_json(
        "featurize",
        data,
        "--store",
        tmp_path / "new.h5",
        "--weights",
        tmp_path / "ft/backbone.safetensors",
        "--arch",
        ARCH,
        "--precision",
        "fp32",
    )
    _, config = load_head(head_dir)
    info = run_json("store", "info", tmp_path / "new.h5")
    assert info["sets"][0]["weights_sha256"] != config.feature_set.identity.weights_sha256 and again["featurized"] == 18
    resumed = run_json("finetune", data, "--head", head_dir, "--resume", tmp_path / "ft")
    assert len(resumed["history"]) == 1  # already finished: nothing more to do


@pytest.mark.slow
def test_cli_finetune_killed_then_resumed_equals_uninterrupted(tiny, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import REPO

    data, head_dir = tiny
    args = ["finetune", str(data), "--head", str(head_dir), "--epochs", "2", "--batch-size", "4"]
    whole = run_json(*args, "--out", tmp_path / "whole")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--out", str(tmp_path / "killed")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resumed = run_json("finetune", data, "--head", head_dir, "--resume", tmp_path / "killed")
    assert [r["train_loss"] for r in resumed["history"]] == pytest.approx([r["train_loss"] for r in whole["history"]])
    assert resumed["accuracy"] == whole["accuracy"]


@pytest.mark.slow
def test_two_process_finetune_follows_one_process_with_the_same_global_batch(tiny, tmp_path):
    import json
    import subprocess

    from conftest import REPO

    data, head_dir = tiny
    _, config = load_head(head_dir)
    # A linear head: no dropout or batch norm, whose draws would differ between one and two processes.
    run_json(
        "train-head",
        "--store",
        config.feature_set.store,
        "--head",
        "linear",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--out",
        tmp_path / "linear",
    )
    args = ["finetune", str(data), "--head", str(tmp_path / "linear"), "--epochs", "2", "--batch-size", "4", "--json"]
    one = run_json(*args[:-1], "--out", tmp_path / "one")
    proc = subprocess.run(
        torchrun_cmd(2, *args, "--out", tmp_path / "two"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    assert two["processes"] == 2
    assert [r["train_loss"] for r in two["history"]] == pytest.approx(
        [r["train_loss"] for r in one["history"]], rel=1e-3
    )
    assert [r["valid_loss"] for r in two["history"]] == pytest.approx(
        [r["valid_loss"] for r in one["history"]], rel=1e-3
    )
    assert read_checkpoint(tmp_path / "two")["world_size"] == 2


@pytest.mark.slow
def test_keep_best_hands_back_the_starting_model_when_training_only_hurts(tiny, tmp_path):
    data, _ = tiny
    t = tuner(tiny, tmp_path, epochs=1, lr=1.0, lr_mult=1.0, clip=1e3)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    valid = split(data, "valid")
    t.before = t.evaluate(*valid)
    t.remember_if_best(-1, t.before)
    t.fit(split(data, "train"), valid)
    last = t.history[-1]
    assert last["accuracy"] < t.before["accuracy"] or not last["valid_loss"] < t.before["valid_loss"]
    assert not all(torch.equal(v, t.model.state_dict()[k]) for k, v in start.items())
    kept = t.restore_best()
    assert kept["epoch"] == -1 and kept["accuracy"] == t.before["accuracy"]
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in start.items())


def test_a_diverging_fine_tune_stops_with_an_error_and_keeps_its_checkpoint(tiny, tmp_path):
    from stages.errors import PipelineError

    data, _ = tiny
    t = tuner(tiny, tmp_path, epochs=2, lr=10.0, lr_mult=1.0, clip=1e3)
    with pytest.raises(PipelineError, match="diverged at epoch"):
        t.fit(split(data, "train"), split(data, "valid"))
    assert not (tmp_path / "checkpoint.pt").exists() or read_checkpoint(tmp_path)["step"] == 0


def test_training_crops_at_train_size_validation_at_the_backbone_size(tiny, tmp_path):
    """--train-size: the training batches are that size (augmented view only), validation keeps the backbone's."""
    data, _ = tiny
    t = tuner(tiny, tmp_path, epochs=1, train_size=96)
    seen = []
    t.model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[1:])))
    t.fit(split(data, "train"), split(data, "valid"))
    size = t.preprocessing.size
    assert (3, 96, 96) in seen and (3, size, size) in seen and size != 96
    assert len([s for s in seen if s == (3, 96, 96)]) == 3  # 12 training images in batches of 4, one view each
    with pytest.raises(PipelineError, match="--train-size 8 is out of range"):
        FinetuneConfig(train_size=8).validate()


def test_label_smoothing_softens_the_training_targets(tiny, tmp_path):
    """The same run with smoothed targets trains on a higher loss (the targets are never one-hot), and the option
    is bounded."""
    data, _ = tiny
    plain = tuner(tiny, tmp_path / "a", epochs=1, label_smoothing=0.0)
    smoothed = tuner(tiny, tmp_path / "b", epochs=1, label_smoothing=0.5)
    plain.fit(split(data, "train"), None)
    smoothed.fit(split(data, "train"), None)
    assert smoothed.step_losses[0] > plain.step_losses[0]
    with pytest.raises(PipelineError, match="--label-smoothing 1.0 is out of range"):
        FinetuneConfig(label_smoothing=1.0).validate()


def test_calibration_images_are_a_stable_share_of_each_class():
    paths = [f"train/{c}/{i}.jpg" for c in "ab" for i in range(50)]
    labels = np.repeat([0, 1], 50)
    held = held_out_images(paths, labels, 0.1, seed=0)
    assert held[:50].sum() == held[50:].sum() == 5
    assert np.array_equal(held, held_out_images(paths, labels, 0.1, seed=0))
    assert not np.array_equal(held, held_out_images(paths, labels, 0.1, seed=1))
    assert held_out_images(paths, labels, 0.2, seed=0).sum() == 20
    assert not held_out_images(paths, labels, 0.0, seed=0).any()
    with pytest.raises(PipelineError, match="--calibration-pct 0.7 is out of range"):
        FinetuneConfig(calibration_pct=0.7).validate()


def test_refit_head_repeats_the_recorded_fit_without_the_left_out_images(tiny):
    from pipeline.train_head import refit_head

    _, head_dir = tiny
    head, config = load_head(head_dir)
    same = refit_head(head_dir, config, set())
    assert all(torch.equal(a, b) for a, b in zip(same.classifier.parameters(), head.classifier.parameters()))
    assert float(same.temperature) == 1.0  # uncalibrated: the caller fits it on what it left out
    other = refit_head(head_dir, config, {"train/a/a_000.jpg", "train/b/b_000.jpg"})
    assert not torch.equal(other.classifier[1].weight, head.classifier[1].weight)


def test_cli_finetune_without_the_head_store_says_what_to_do(tiny, tmp_path):
    from conftest import run_cli

    data, head_dir = tiny
    _, config = load_head(head_dir)
    store = tmp_path / "gone.h5"
    run_json("featurize", data, "--store", store, "--weights", config.feature_set.weights_path, "--arch", ARCH)
    run_json("train-head", "--store", store, "--out", tmp_path / "head")
    store.unlink()
    args = ["finetune", data, "--head", tmp_path / "head", "--epochs", "1", "--batch-size", "4"]
    proc = run_cli(*args, "--out", tmp_path / "ft", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "gone.h5" in proc.stderr and "--calibration-pct 0" in proc.stderr
    kept = run_json(*args, "--calibration-pct", "0", "--out", tmp_path / "ft0")
    assert kept["calibration_images"] == 0
    assert kept["temperature"] == pytest.approx(float(load_head(tmp_path / "head")[0].temperature))


@pytest.mark.parametrize("images, batch, world", [(10, 4, 2), (9, 4, 2), (12, 8, 2), (5, 8, 4), (1, 4, 2)])
def test_every_rank_takes_a_step_for_every_global_batch(images, batch, world):
    from stages.ranks import Ranks

    order = list(range(images))
    shares = [Ranks(rank, world).share(order, batch) for rank in range(world)]
    steps = -(-images // batch)
    size = batch // world
    for share in shares:  # a rank's list is cut into per-step batches of `size`: one per global batch
        assert steps - 1 < len(share) / size <= steps and len(share) > (steps - 1) * size
    taken = sorted(i for share in shares for i in share)
    last = images - (steps - 1) * batch
    assert set(taken) == set(order) and len(taken) == images + max(0, world - last)  # topped up to one per rank
    assert Ranks(1, world).share(order, batch, first_step=1) == shares[1][size:]


def test_cli_finetune_fits_the_temperature_on_the_held_out_images(tiny, tmp_path):
    data, head_dir = tiny
    result = run_json(
        "finetune", data, "--head", head_dir, "--epochs", "1", "--batch-size", "4", "--no-keep-best", "--out", tmp_path
    )
    saved, _ = load_head(tmp_path)
    assert result["kept_epoch"] is None and result["calibration_images"] == 2
    assert float(saved.temperature) == pytest.approx(result["temperature"])  # saved where predict reads it
    assert len(saved.conformity) == 2  # its prediction sets calibrated on the same held-out images
    # familiarity from the fine-tuned backbone's own features: the training images as reference, the threshold
    # from the held-out ones
    familiar = json.loads((tmp_path / "metrics.json").read_text())["familiarity"]
    assert familiar["reference_images"] == 10 and familiar["neighbour"] == 1
    [predicted] = run_json("predict", tmp_path, sorted((data / "valid").rglob("*.jpg"))[0])["predictions"]
    assert {"familiarity", "unfamiliar"} <= set(predicted)


@pytest.mark.slow
def test_a_fine_tune_does_not_depend_on_how_its_data_folder_is_spelled(tiny, tmp_path):
    """The same folder given relative to the working directory or absolute: the same augmentation, the same run."""
    data, head_dir = tiny
    runs = [
        run_json("finetune", folder, "--head", head_dir, "--epochs", "1", "--batch-size", "4", "--out", tmp_path / name)
        for folder, name in ((data, "absolute"), (os.path.relpath(data, REPO), "relative"))
    ]
    figures = [[{k: v for k, v in epoch.items() if k != "time"} for epoch in run["history"]] for run in runs]
    assert figures[0] == figures[1] and runs[0]["temperature"] == runs[1]["temperature"]
