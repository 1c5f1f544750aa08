"""Heads on cached features: learning, schedules, determinism, streaming, grids, lr-find, compatibility, errors."""

import json

import numpy as np
import pytest
import torch
from conftest import make_images, one_line_error, run_cli, run_json
from PIL import Image

from bench.synthetic import separable_features, write_feature_store
from pipeline.train_head import load_cached_features
from stages.calibration import expected_calibration_error, fit_temperature, image_folds, reliability_bins
from stages.errors import PipelineError
from stages.head import Head, evaluate_head, load_head, schedule_values, train_head, train_heads
from stages.linear_probe import HELD_OUT_ROWS, L2_GRID, as_batch, fold_count, fold_logits, solve, train_logreg
from stages.rundir import check_compatible
from stages.settings import TrainConfig
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
    model, history, steps = train_head(
        data.train_rows(0), data.valid, TrainConfig(head=head, epochs=4, lr=1e-2, batch_size=32), 3
    )
    assert history[-1]["accuracy"] > 0.95
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(steps) == 4 * int(np.ceil(300 / 32))
    assert torch.allclose(model.standardize.mean, data.train.features[::3].float().mean(0), atol=1e-2)


def test_heads_trained_together_are_the_heads_trained_alone(blob_store):
    """A grid's AdamW heads share each batch (one draw, one standardization, one product for the linear ones) yet
    each is its lone run's head: its own initialization, dropout draws, optimizer state, schedule and epochs."""
    data = cached(blob_store)
    rows = data.train_rows(0)
    cfgs = [
        TrainConfig(head="linear", epochs=2, lr=1e-2, batch_size=32),
        TrainConfig(head="linear", epochs=1, lr=3e-2, wd=1e-2, batch_size=32, schedule="cosine"),
        TrainConfig(head="mlp", epochs=2, lr=3e-3, batch_size=32),
        TrainConfig(head="mlp", epochs=1, lr=1e-2, batch_size=32, hidden=64),
    ]
    together = train_heads(rows, data.valid, cfgs, 3)
    for cfg, (head, history, steps) in zip(cfgs, together):
        alone, alone_history, alone_steps = train_head(rows, data.valid, cfg, 3)
        assert len(history) == cfg.epochs and len(steps) == len(alone_steps)
        for a, b in zip(head.state_dict().values(), alone.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5)
        assert history[-1]["valid_loss"] == pytest.approx(alone_history[-1]["valid_loss"], abs=1e-5)
    capped = train_heads(rows, None, cfgs[:2], 3, max_steps=5)  # lr-find's cap on a probe's steps
    assert [len(steps) for _, _, steps in capped] == [5, 5]


def test_schedule_shapes():
    one = schedule_values("onecycle", 0.1, 100)
    peak = int(np.argmax(one))
    assert 20 <= peak <= 30 and abs(max(one) - 0.1) < 1e-3
    assert one[0] < 0.1 / 10 and one[-1] < 1e-4
    assert all(a <= b + 1e-12 for a, b in zip(one[:peak], one[1 : peak + 1]))
    assert all(a >= b - 1e-12 for a, b in zip(one[peak:], one[peak + 1 :]))
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


@pytest.mark.slow
def test_cli_lr_find_and_auto(blob_store, tmp_path):
    result = run_json("lr-find", "--store", blob_store, "--out", tmp_path / "lr")
    assert result["lrs"][0] == pytest.approx(1e-5) and len(result["lrs"]) <= 21
    losses = dict(zip(result["lrs"], result["held_out_loss"]))
    assert losses[result["suggestion"]] == min(losses.values())
    assert losses[result["suggestion"]] < losses[result["lrs"][0]] / 2  # the lowest rates barely learn
    with Image.open(result["plot"]) as png:
        assert png.format == "PNG" and png.size[0] >= 400
    board = run_json(
        "train-head", "--store", blob_store, "--head", "linear", "--lr", "auto", "--out", tmp_path / "auto"
    )
    assert board[0]["lr"] == pytest.approx(result["suggestion"]) and board[0]["accuracy"] > 0.9
    one_line_error(run_cli("lr-find", "--store", blob_store, "--head", "logreg", check=False), "takes no learning rate")


@pytest.mark.slow
def test_lr_find_suggestion_is_near_the_best_rate_of_a_grid(blob_store):
    """The suggestion lands within a factor of 3 of the rate whose run does best out of fold."""
    from stages.head import lr_find

    data = cached(blob_store)
    rows = data.train_rows(0)
    folds, plain, _ = data.folds(rows, 5, 0)
    cfg = TrainConfig(head="linear", epochs=3)
    found = lr_find(rows, folds, plain, cfg, 3)
    grid = np.geomspace(1e-4, 1, 9)
    held = rows.select(rows.rows[folds == 1])
    from stages.head import evaluate_head

    loss = [
        evaluate_head(
            train_head(rows.select(rows.rows[folds != 1]), None, TrainConfig(head="linear", lr=lr), 3)[0], held
        )["loss"]
        for lr in grid
    ]
    best = grid[int(np.argmin(loss))]
    assert best / 3 <= found.suggestion <= best * 3, (found.suggestion, best)


def test_logreg_converges_to_the_regularized_optimum(blob_store):
    data = cached(blob_store)
    rows = data.train_rows(0)
    folds, plain, _ = data.folds(rows, 5, 0)
    head, fit = train_logreg(rows, folds, plain, 3, l2=0.05, calibrate=False)
    selected = torch.from_numpy(rows.rows)
    x = head.standardize(rows.features[selected].float()).detach()
    w = torch.cat([head.classifier.weight, head.classifier.bias[:, None]], 1).detach().requires_grad_(True)
    loss = (
        torch.nn.functional.cross_entropy(x @ w[:, :-1].T + w[:, -1], rows.labels[selected])
        + 0.025 * w[:, :-1].square().sum()
    )
    loss.backward()
    assert w.grad.abs().max() < 1e-4  # the gradient of the objective vanishes: fitted to convergence
    assert head.temperature == 1.0 and fit["l2"] == 0.05


def test_logreg_chooses_l2_by_cross_validation_on_train_alone(blob_store):
    data = cached(blob_store)
    rows = data.train_rows(0)
    folds, plain, _ = data.folds(rows, 5, 0)
    path = []
    head, fit = train_logreg(rows, folds, plain, 3, on_strength=path.append)
    assert fit["l2"] in L2_GRID and path == fit["path"]
    best = min(path, key=lambda r: r["cv_loss"])
    assert fit["l2"] == best["l2"] and fit["cv_loss"] == best["cv_loss"]
    assert [r["l2"] for r in path] == list(L2_GRID[: len(path)])  # strong to weak, stopped once it got worse
    assert path[-1]["cv_loss"] > best["cv_loss"] or len(path) == len(L2_GRID)
    assert 0.05 < fit["temperature"] < 20 and float(head.temperature) == pytest.approx(fit["temperature"])


def test_logreg_streamed_equals_in_memory(blob_store):
    memory, stream = cached(blob_store, "4G"), cached(blob_store, "1K")
    results = []
    for data in (memory, stream):
        rows = data.train_rows(2)
        folds, plain, _ = data.folds(rows, 5, 0)
        results.append(train_logreg(rows, folds, plain, 3, l2=0.1, calibrate=False)[0])
    a, b = results
    assert torch.allclose(a.classifier.weight, b.classifier.weight, atol=1e-4)


def test_out_of_fold_logits_are_each_folds_own_fit_streamed_or_in_memory(blob_store):
    """fold_logits (the audit's out-of-sample probabilities): every row scored by a fit on the other folds alone,
    in the selection's order, the same whether the rows are in memory or streamed from the store in blocks."""
    memory, stream = cached(blob_store, "4G"), cached(blob_store, "1K")
    scored = []
    for data in (memory, stream):
        rows = data.train_rows(0)
        rows = rows.select(np.random.default_rng(1).permutation(rows.rows))  # not in stored order
        folds, plain, _ = data.folds(rows, 4, 0)
        head, fit = train_logreg(rows, folds, plain, 3, l2=0.1)
        scored.append(fold_logits(rows, folds, head, fit["l2"]))
    assert torch.allclose(scored[0], scored[1], atol=1e-4)
    features = memory.train_rows(0).features
    for f in range(4):  # each fold by hand: a fresh fit on the other folds' standardized rows
        inside = torch.from_numpy(rows.rows[folds != f])
        x = (features[inside].float() - head.standardize.mean) / head.standardize.std
        batch = as_batch(x, rows.labels[inside])
        weight = solve(lambda batch=batch: [batch], len(inside), torch.zeros(3, x.shape[1] + 1), fit["l2"])
        held = torch.from_numpy(rows.rows[folds == f])
        own = (features[held].float() - head.standardize.mean) / head.standardize.std @ weight[:, :-1].T
        mine = scored[1][torch.from_numpy(folds == f)]
        assert torch.allclose(mine.softmax(1), (own + weight[:, -1]).softmax(1), atol=1e-3)  # a bias shift is free


def test_rows_are_plenty_past_k_held_out_shares():
    assert fold_count(5 * HELD_OUT_ROWS, 5) == (5, False)  # k-fold cross-validation up to k held-out shares
    assert fold_count(5 * HELD_OUT_ROWS + 1, 5) == (5, True)  # then fold 0 alone is held out
    assert fold_count(90 * HELD_OUT_ROWS + 7, 5) == (90, True)  # in folds of about HELD_OUT_ROWS


def test_held_out_logreg_never_fits_the_held_out_share_and_calibrates_on_it(blob_store):
    """Where rows are plenty one fold is held out: the head is fitted on the others alone, and its temperature on
    its own outputs for the held-out plain rows. Relabelling held-out rows moves the temperature, never a weight."""
    data = cached(blob_store)
    rows = data.train_rows(2)
    paths = data.feature_set.column("train", "paths")
    plain = data.feature_set.column("train", "view")[rows.rows] == 0
    folds = image_folds([paths[r] for r in rows.rows], rows.labels[rows.rows].numpy(), 10, seed=0)
    head, fit = train_logreg(rows, folds, plain, 3, l2=0.1, held_out=True)
    held = (folds == 0) & plain
    assert fit["cv_rows"] == held.sum() and len(fit["out_of_fold_logits"]) == held.sum()
    scored = torch.from_numpy(np.sort(rows.rows[held]))
    with torch.no_grad():
        own = head.classifier(head.standardize(rows.features[scored].float()))
    assert torch.allclose(fit["out_of_fold_logits"], own, atol=1e-5)
    wrong = rows.select(rows.rows)
    wrong.labels = rows.labels.clone()
    wrong.labels[scored] = (wrong.labels[scored] + 1) % 3  # every held-out label wrong
    other, _ = train_logreg(wrong, folds, plain, 3, l2=0.1, held_out=True)
    assert torch.equal(other.classifier.weight, head.classifier.weight)
    assert float(other.temperature) > 5 * float(head.temperature)  # wrong labels: far less confident
    auto, _ = train_logreg(rows, folds, plain, 3, held_out=True)  # the strength chosen on the held-out share
    assert evaluate_head(auto, data.valid)["accuracy"] > 0.95


def test_folds_keep_an_images_views_together_and_are_stratified():
    paths = [f"c{i % 2}/img{i // 3}.jpg" for i in range(60)]  # three rows (views) per image
    labels = np.asarray([int(p[1]) for p in paths])
    folds = image_folds(paths, labels, 5, seed=0)
    by_image = {}
    for p, f in zip(paths, folds):
        by_image.setdefault(p, set()).add(f)
    assert all(len(f) == 1 for f in by_image.values())
    for c in (0, 1):
        counts = np.bincount(folds[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 3
    assert not np.array_equal(folds, image_folds(paths, labels, 5, seed=1))


def test_temperature_and_calibration_error():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 4000))
    # Its own generator: under pytest-xdist the global RNG's state depends on which tests ran before on the worker.
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    honest = noise + 1.5 * torch.nn.functional.one_hot(labels, 3)
    assert fit_temperature(honest * 4, labels) == pytest.approx(4 * fit_temperature(honest, labels), rel=0.02)
    over = (honest * 4).softmax(1).numpy()
    fixed = (honest * 4 / fit_temperature(honest * 4, labels)).softmax(1).numpy()
    # Over-confident: 0.145; refitted: 0.018 here, and 0.011-0.025 over other draws of 4000 (sampling noise).
    assert expected_calibration_error(fixed, labels.numpy()) < 0.03
    assert expected_calibration_error(over, labels.numpy()) > 0.1
    # ECE by hand: two bins used, confidence 0.9 with accuracy 1/2, confidence 0.6 with accuracy 1
    probs = np.asarray([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, np.asarray([0, 1, 0, 0])) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert sum(b["count"] for b in reliability_bins(probs, np.zeros(4))) == 4


def test_head_probabilities_use_the_temperature():
    head = Head("logreg", 4, 2, temperature=2.0)
    x = torch.randn(5, 4)
    assert torch.allclose(head(x) * 2, head.classifier(head.standardize(x)))


@pytest.mark.slow
def test_cli_grid_runs_every_combination_ranked_and_listed(blob_store, tmp_path):
    board = run_json(
        "train-head",
        "--store",
        blob_store,
        "--head",
        "linear,mlp",
        "--lr",
        "1e-2,1e-6",
        "--views",
        "0,2",
        "--epochs",
        "2",
        "--out",
        tmp_path / "grid",
    )
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
    text = run_cli("train-head", "--store", blob_store, "--head", "linear", "--out", tmp_path / "one").stdout
    assert "epoch" in text and "train_loss" in text and "accuracy" in text
    text = run_cli("train-head", "--store", blob_store, "--out", tmp_path / "default").stdout
    assert "cv_loss" in text and "l2" in text and "temperature" in text


@pytest.mark.slow
def test_runs_are_ranked_per_data_set(blob_store, tmp_path):
    """Runs of different stores never share a leaderboard: each board names its store, set and labels."""
    other = write_feature_store(
        tmp_path / "other.h5", separable_features(60, classes=2, seed=5), separable_features(20, classes=2, seed=5)
    )
    for store, name in ((blob_store, "a1"), (other, "b1"), (blob_store, "a2")):
        run_json("train-head", "--store", store, "--head", "linear", "--epochs", "1", "--out", tmp_path / "runs" / name)
    listed = run_json("runs", "--dir", tmp_path / "runs")
    stores = [r["store"] for r in listed]
    assert sorted(stores) == sorted([str(blob_store.resolve())] * 2 + [str(other.resolve())])
    assert stores.index(str(other.resolve())) in (0, 2)  # grouped: the two blob runs sit together
    assert all(r["set"] for r in listed)
    text = run_cli("runs", "--dir", tmp_path / "runs").stdout
    assert f"2 runs on {blob_store.resolve()}" in text and f"1 run on {other.resolve()}" in text


@pytest.mark.slow
def test_cli_default_is_calibrated_logreg(blob_store, tmp_path):
    [run] = run_json("train-head", "--store", blob_store, "--out", tmp_path / "default")
    assert run["head"] == "logreg" and run["l2"] in L2_GRID and run["accuracy"] > 0.95
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["train"]["l2"] == run["l2"] and config["head"]["head"] == "logreg"
    head, _ = load_head(tmp_path / "default")
    assert float(head.temperature) == pytest.approx(run["temperature"]) == 1.0  # no out-of-fold mistake: left at 1
    noisy = write_feature_store(
        tmp_path / "noisy.h5",
        separable_features(300, classes=3, noise=6.0),
        separable_features(90, classes=3, noise=6.0),
        classes=("x", "y", "z"),
    )
    [fitted] = run_json("train-head", "--store", noisy, "--out", tmp_path / "noisy")
    assert 0.4 < fitted["accuracy"] < 0.99 and fitted["temperature"] != 1.0
    assert float(load_head(tmp_path / "noisy")[0].temperature) == pytest.approx(fitted["temperature"])
    [plain] = run_json(
        "train-head", "--store", blob_store, "--no-calibrate", "--l2", str(run["l2"]), "--out", tmp_path / "plain"
    )
    assert plain["temperature"] == 1.0 and plain["accuracy"] == run["accuracy"]
    grid = run_json(
        "train-head", "--store", blob_store, "--head", "logreg,linear", "--lr", "1e-2,3e-2", "--out", tmp_path / "grid"
    )
    assert sorted(r["head"] for r in grid) == ["linear", "linear", "logreg"]  # logreg takes no lr: run once


@pytest.mark.slow
def test_config_refuses_features_of_another_backbone(blob_store, tmp_path):
    run_json("train-head", "--store", blob_store, "--out", tmp_path / "a")
    _, config = load_head(tmp_path / "a")
    other = write_feature_store(tmp_path / "other.h5", separable_features(10), backbone="resnet50")
    with FeatureStore(other) as fs:
        other_set = fs.feature_set()
        with pytest.raises(PipelineError, match="trained on features of efficientnet_lite0.*resnet50"):
            check_compatible(config, other_set.identity, other_set.name, tmp_path / "a")
    with FeatureStore(blob_store) as fs:
        check_compatible(config, fs.feature_set().identity, fs.feature_set().name, tmp_path / "a")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--lr", "-1"), "--lr -1.0 is out of range"),
        (("--head", "transformer"), "--head 'transformer' is not one of logreg, linear, mlp"),
        (("--views", "5"), "--views 5 is more than the store holds (2"),
        (("--lr", "fast"), "--lr 'fast' is not a comma-separated list"),
        (("--schedule", "step"), "--schedule 'step'"),
        (("--max-memory", "lots"), "--max-memory 'lots' is not a size"),
        (("--l2", "-1"), "--l2 -1.0 is out of range"),
        (("--folds", "1"), "--folds 1 is out of range"),
    ],
)
def test_bad_options_are_one_line_errors(blob_store, tmp_path, args, message):
    one_line_error(run_cli("train-head", "--store", blob_store, "--out", tmp_path / "x", *args, check=False), message)


def test_missing_store_is_a_clear_error(tmp_path):
    proc = run_cli("train-head", "--store", tmp_path / "none.h5", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "pipeline featurize" in proc.stderr


@pytest.mark.slow
def test_a_feature_constant_on_train_cannot_explode_on_valid(tmp_path):
    """Generated images leave some features at exactly 0 on train; one firing on valid must not decide the class."""
    train = separable_features(90, classes=3, seed=0)
    train[0][:, :5] = 0  # dead on train
    valid = separable_features(30, classes=3, seed=0)
    valid[0][:, :5] = 3.0  # fires on every valid image
    store = write_feature_store(tmp_path / "dead.h5", train, valid, classes=("x", "y", "z"))
    for head in ("logreg", "linear"):
        [run] = run_json(
            "train-head",
            "--store",
            store,
            "--head",
            head,
            "--epochs",
            "30",
            "--batch-size",
            "32",
            "--out",
            tmp_path / head,
        )
        assert run["accuracy"] > 0.95 and run["valid_loss"] < 0.5, run
    model, _ = load_head(tmp_path / "logreg")
    assert torch.isinf(model.standardize.std[:5]).all() and torch.isfinite(model.standardize.std[5:]).all()


@pytest.mark.slow
def test_train_head_refuses_to_overwrite_a_run_unless_asked(trained, tmp_path):
    _, store, _ = trained
    first = run_json("train-head", "--store", store, "--out", tmp_path / "run")
    before = (tmp_path / "run" / "head.safetensors").read_bytes()
    one_line_error(
        run_cli("train-head", "--store", store, "--head", "linear", "--out", tmp_path / "run", check=False),
        str(tmp_path / "run"),
        "--overwrite",
    )
    assert (tmp_path / "run" / "head.safetensors").read_bytes() == before
    again = run_json("train-head", "--store", store, "--head", "linear", "--out", tmp_path / "run", "--overwrite")
    assert again[0]["head"] == "linear" and first[0]["head"] == "logreg"


@pytest.mark.slow
def test_a_valid_split_left_empty_trains_without_validation(tmp_path):
    """valid/ reaching only train's files (stored once, in train) leaves valid empty: the head trains, unscored."""
    data = make_images(tmp_path / "data", {"train": {"a": 6, "b": 6}})
    (data / "valid").symlink_to(data / "train")
    summary = run_json("featurize", data, "--store", tmp_path / "s.h5", "--batch-size", "8")
    assert summary["images"]["train"] == 12 and not summary["images"].get("valid")
    [run] = run_json("train-head", "--store", tmp_path / "s.h5", "--out", tmp_path / "head")
    assert run["accuracy"] is None and (tmp_path / "head" / "head.safetensors").is_file()


def test_a_run_config_reads_back_as_written_and_skips_settings_it_does_not_know():
    from stages.identity import FeatureSetIdentity
    from stages.rundir import RunConfig, TrainedOn
    from stages.settings import FinetuneSettings, HeadSpec

    identity = FeatureSetIdentity("efficientnet_lite0", "tf_efficientnet_lite0", "ab" * 32, {"size": 224}, 1280)
    config = RunConfig(
        kind="head",
        head=HeadSpec("logreg", 1280, 3, 512, 0.5),
        classes=["a", "b", "c"],
        train=TrainConfig(l2=0.1),
        feature_set=TrainedOn(identity, "runs/s.h5", "set-1"),
        created="2026-12-05T10:00:00",
    )
    written = json.loads(json.dumps(config.to_json()))
    assert RunConfig.from_json(written) == config
    assert "task" not in written["head"] and written["train"]["l2"] == 0.1  # config.json as before: a single task
    written["train"]["from_a_later_version"] = 1
    del written["train"]["folds"]  # or one written before the setting existed
    assert RunConfig.from_json(written).train == TrainConfig(l2=0.1)
    tuned = RunConfig(
        kind="finetune",
        head=HeadSpec("linear", 1280, 3, 512, 0.5, task="multi"),
        classes=["a", "b", "c"],
        train=FinetuneSettings(epochs=2, head="linear", from_head="runs/head-a"),
        feature_set=TrainedOn(identity),
        created="2026-12-05T10:00:00",
    )
    again = RunConfig.from_json(json.loads(json.dumps(tuned.to_json())))
    assert again == tuned and again.head.task == "multi" and again.settings["head"] == "linear"
    assert again.settings["views"] is None  # a fine-tune has no stored views: its leaderboard cell is empty
