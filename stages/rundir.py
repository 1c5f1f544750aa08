"""The run directory: what train-head and finetune write, and what predict, evaluate, export, audit and the model
API read. Its file names, its config's seal and checks, and the listing of runs live here and nowhere else.

A run directory holds config.json (sealed with a checksum), metrics.json, head.safetensors, curves.png, and for a
fine-tune backbone.safetensors and checkpoint.pt. Reading a listing imports neither torch nor safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from stages.atomic import write_json
from stages.errors import PipelineError

CONFIG = "config.json"
METRICS = "metrics.json"
HEAD_WEIGHTS = "head.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
CHECKPOINT = "checkpoint.pt"
CURVES = "curves.png"
RUN_MARKERS = (CONFIG, CHECKPOINT)  # a folder holding either is a run, finished or not


def config_checksum(config: dict) -> str:
    """sha256 of a run's config.json content, its own checksum field left out."""
    content = {k: v for k, v in config.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def seal_config(config: dict) -> dict:
    """The config with its checksum, so that a hand-edited config.json is recognised as edited."""
    return {**config, "checksum": config_checksum(json.loads(json.dumps(config, default=str)))}


def check_config(config, run_dir: Path) -> None:
    """Refuse a config.json that does not describe the head beside it: wrong shape, edited, or inconsistent."""
    where = f"{run_dir / CONFIG}"
    if not isinstance(config, dict):
        raise PipelineError(f"{where} is damaged: it holds {type(config).__name__}, not an object; train again")
    if "checksum" in config and config["checksum"] != config_checksum(config):
        raise PipelineError(
            f"{where} was edited after training (its checksum does not match its content); "
            "restore the original or train again"
        )
    spec, classes, feature_set = config.get("head"), config.get("classes"), config.get("feature_set")
    expected = {"head": str, "feature_dim": int, "num_classes": int, "hidden": int, "dropout": (int, float)}
    if not isinstance(spec, dict) or any(not isinstance(spec.get(k), t) for k, t in expected.items()):
        raise PipelineError(f"{where} is damaged: 'head' must hold {', '.join(expected)}; train again")
    if (
        not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise PipelineError(f"{where} is damaged: 'classes' must be a list of distinct names; train again")
    if len(classes) != spec["num_classes"]:
        raise PipelineError(
            f"{where} names {len(classes)} classes but the head has {spec['num_classes']} outputs; "
            "restore the original config.json or train again"
        )
    if not isinstance(feature_set, dict) or not all(
        isinstance(feature_set.get(k), str) for k in ("backbone", "weights_sha256")
    ):
        raise PipelineError(
            f"{where} is damaged: 'feature_set' must name the backbone and its weights_sha256; train again"
        )


def read_config(run_dir: Path | str) -> dict:
    """A run's config, checked: present beside its head weights, parseable, unedited and self-consistent."""
    run_dir = Path(run_dir)
    for name in (CONFIG, HEAD_WEIGHTS):
        if not (run_dir / name).is_file():
            raise PipelineError(
                f"{run_dir} is not a head run: {name} is missing; give a directory written by pipeline train-head"
            )
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{run_dir / CONFIG} is damaged ({str(exc).splitlines()[0][:100]}); train again") from None
    check_config(config, run_dir)
    return config


def read_weights(path: Path) -> dict:
    """Tensors of a safetensors file (torch imported here, on first use)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def write_weights(out: Path, weights: dict[str, dict]) -> None:
    """Write each {file name: state_dict} as safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / name))


def write_run(
    out: Path, weights: dict[str, dict], config: dict, metrics: dict, plot_curves: Callable[[Path], None]
) -> None:
    """Write a run's files into a folder (the staging folder stages.atomic.published_folder publishes whole)."""
    write_weights(out, weights)
    write_json(out / CONFIG, seal_config(config))
    write_json(out / METRICS, metrics)
    plot_curves(out / CURVES)


def rank_runs(rows: list[dict]) -> list[dict]:
    """Best first: highest valid accuracy, then lowest valid loss."""

    def key(r: dict) -> tuple[float, float]:
        accuracy, loss = r.get("accuracy"), r.get("valid_loss")
        return -(accuracy if accuracy is not None else 0), loss if loss is not None else float("inf")

    return sorted(rows, key=key)


def list_runs(root: Path, store: Path | None = None) -> list[dict]:
    """Every run under root (head or fine-tune) with its settings and scores, best first."""
    rows = []
    for config_path in sorted(Path(root).rglob(CONFIG)):
        try:
            config = json.loads(config_path.read_text())
            metrics = json.loads((config_path.parent / METRICS).read_text())
        except (OSError, ValueError):
            continue
        feature_set = config.get("feature_set", {})
        if store is not None and feature_set.get("store") != str(store.resolve()):
            continue
        train = config.get("train", {})
        rows.append(
            {
                "run": str(config_path.parent),
                "kind": config.get("kind"),
                "head": train.get("head"),
                "lr": train.get("lr"),
                "wd": train.get("wd"),
                "epochs": train.get("epochs"),
                "views": train.get("views"),
                "backbone": feature_set.get("backbone"),
                "accuracy": metrics.get("accuracy"),
                "valid_loss": metrics.get("valid_loss"),
                "created": config.get("created"),
            }
        )
    return rank_runs(rows)
