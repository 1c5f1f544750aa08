"""train-head, lr-find and runs: head experiments on a feature store's cached features."""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.atomic import atomic_output, write_json
from pipeline.plots import plot_lr_find, plot_training_curves
from stages.errors import PipelineError
from stages.head import (HEAD_FILE, Head, SplitFeatures, TrainConfig, evaluate_head, lr_find, parse_size,
                         select_rows, train_head)
from store.reader import FeatureSet, FeatureStore

COMPATIBLE_FIELDS = ("backbone", "arch", "weights_sha256", "preprocessing", "feature_dim")


@dataclass
class CachedFeatures:
    """A feature set's train and valid splits, loaded once and shared by every run of a grid."""

    store: Path
    feature_set: FeatureSet
    train: SplitFeatures
    valid: SplitFeatures | None
    views_in_store: int

    @property
    def classes(self) -> list[str]:
        return self.feature_set.classes

    def train_rows(self, views: int) -> SplitFeatures:
        return self.train.select(select_rows(self.feature_set.column("train", "view"), views))


def load_cached_features(store: FeatureStore, set_name: str | None = None, max_memory: str = "4G") -> CachedFeatures:
    """Open the train (all views) and valid (view 0) splits; in memory when they fit under max_memory."""
    fs = store.feature_set(set_name)
    if "train" not in fs.splits:
        raise PipelineError(f"store {store.path} set {fs.name} has no train split; featurize a folder with train/")
    limit = parse_size(max_memory)
    views = fs.column("train", "view")
    features = fs.features("train")
    in_memory = features.size * features.dtype.itemsize <= limit
    train = SplitFeatures(features, fs.column("train", "labels"), np.arange(len(views)), in_memory)
    valid = None
    if "valid" in fs.splits:
        vf = fs.features("valid")
        valid = SplitFeatures(vf, fs.column("valid", "labels"), select_rows(fs.column("valid", "view"), 0),
                              vf.size * vf.dtype.itemsize <= limit)
    return CachedFeatures(store.path, fs, train, valid, int(fs.attrs.get("views", 0)))


def feature_set_identity(store_path: Path, fs: FeatureSet) -> dict:
    """What a head needs to know of the features it was trained on, to rebuild the model from raw images."""
    return {"store": str(store_path.resolve()), "set": fs.name, "weights_path": fs.attrs.get("weights_path"),
            **fs.identity}


def check_compatible(config: dict, fs: FeatureSet, run_dir: Path | str) -> None:
    """Refuse features of another backbone, weights or preprocessing than the head was trained on."""
    trained = config["feature_set"]
    differ = [k for k in COMPATIBLE_FIELDS if trained.get(k) != fs.identity.get(k)]
    if differ:
        field = differ[0]
        raise PipelineError(f"{run_dir} was trained on features of {trained.get('backbone')} "
                            f"({field} {str(trained.get(field))[:16]}), but set {fs.name} holds "
                            f"{fs.identity.get('backbone')} ({field} {str(fs.identity.get(field))[:16]}); "
                            "use a store featurized with the same backbone, weights and preprocessing")


def save_head_run(out: Path, head: Head, cfg: TrainConfig, history: list[dict], step_losses: list[float],
                  valid: dict | None, cached: CachedFeatures, seconds: float) -> dict:
    """Write head weights, config.json, metrics.json and curves.png into out; return the metrics."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / HEAD_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    config = {"kind": "head", "head": head.spec(), "classes": cached.classes, "train": cfg.to_dict(),
              "feature_set": feature_set_identity(cached.store, cached.feature_set),
              "created": datetime.now().isoformat(timespec="seconds")}
    metrics = {"history": history, "train_seconds": seconds,
               "accuracy": valid["accuracy"] if valid else None, "valid_loss": valid["loss"] if valid else None,
               "per_class_accuracy": {cached.classes[c]: a for c, a in valid["per_class_accuracy"].items()}
               if valid else {}}
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    with atomic_output(out / "curves.png") as tmp:
        plot_training_curves(history, step_losses, tmp)
    return metrics


def expand_grid(heads: list[str], lrs: list, wds: list[float], epochs: list[int], views: list[int],
                base: TrainConfig) -> list[TrainConfig]:
    """Every combination of the listed values, in a stable order."""
    return [replace(base, head=h, lr=lr, wd=wd, epochs=e, views=v)
            for h, lr, wd, e, v in itertools.product(heads, lrs, wds, epochs, views)]


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.head}-lr{cfg.lr:g}-wd{cfg.wd:g}-e{cfg.epochs}-v{cfg.views}"


def default_out(root: Path = Path("runs")) -> Path:
    return root / f"head-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def find_lr(cached: CachedFeatures, cfg: TrainConfig, out: Path | None = None, **sweep) -> dict:
    """lr-find on cached features; writes lr_find.png into out when given."""
    cfg.validate(cached.views_in_store)
    result = lr_find(cached.train_rows(cfg.views), cfg, len(cached.classes), **sweep)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / "lr_find.png") as tmp:
            plot_lr_find(result, tmp)
        result["plot"] = str(out / "lr_find.png")
    return result


def train_grid(cached: CachedFeatures, configs: list[TrainConfig], out: Path, auto_lr: bool = False,
               on_run: Callable[[int, TrainConfig], None] | None = None,
               on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every config on the same loaded features; return the leaderboard (best valid accuracy first)."""
    for cfg in configs:
        cfg.validate(cached.views_in_store)
    board = []
    for i, cfg in enumerate(configs):
        if auto_lr:
            found = find_lr(cached, cfg)
            cfg = replace(cfg, lr=found["valley"])
        run_dir = out if len(configs) == 1 else out / run_name(cfg)
        if on_run:
            on_run(i, cfg)
        started = time.perf_counter()
        head, history, steps = train_head(cached.train_rows(cfg.views), cached.valid, cfg, len(cached.classes),
                                          on_epoch=on_epoch)
        seconds = time.perf_counter() - started
        valid = evaluate_head(head, cached.valid) if cached.valid is not None else None
        metrics = save_head_run(run_dir, head, cfg, history, steps, valid, cached, seconds)
        board.append({"run": str(run_dir), **{k: getattr(cfg, k) for k in ("head", "lr", "wd", "epochs", "views")},
                      "accuracy": metrics["accuracy"], "valid_loss": metrics["valid_loss"],
                      "train_loss": history[-1]["train_loss"], "seconds": round(seconds, 3)})
    return rank(board)


def rank(rows: list[dict]) -> list[dict]:
    """Best first: highest valid accuracy, then lowest valid loss."""
    return sorted(rows, key=lambda r: (-(r.get("accuracy") or 0), r.get("valid_loss") or float("inf")))


def list_runs(root: Path, store: Path | None = None) -> list[dict]:
    """Every run under root (head or fine-tune) with its settings and scores, best first."""
    rows = []
    for config_path in sorted(root.rglob("config.json")):
        try:
            config = json.loads(config_path.read_text())
            metrics = json.loads((config_path.parent / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        feature_set = config.get("feature_set", {})
        if store is not None and feature_set.get("store") != str(store.resolve()):
            continue
        train = config.get("train", {})
        rows.append({"run": str(config_path.parent), "kind": config.get("kind"), "head": train.get("head"),
                     "lr": train.get("lr"), "wd": train.get("wd"), "epochs": train.get("epochs"),
                     "views": train.get("views"), "backbone": feature_set.get("backbone"),
                     "accuracy": metrics.get("accuracy"), "valid_loss": metrics.get("valid_loss"),
                     "created": config.get("created")})
    return rank(rows)


def default_threads() -> None:
    """Heads are small: a few threads are as fast as many and leave cores for the rest of the machine."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
