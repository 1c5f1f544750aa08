"""The run directory: what train-head and finetune write, and what predict, evaluate, export, audit and the model
API read. Its file names, its config (typed, sealed, checked), the check of features against it, and the listing of
runs live here and nowhere else.

A run directory holds config.json (sealed with a checksum), metrics.json, head.safetensors, familiarity.safetensors,
curves.png, and for a fine-tune backbone.safetensors and checkpoint.pt. Reading a config or a listing imports neither
torch nor safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stages.atomic import write_json
from stages.errors import PipelineError
from stages.identity import BACKBONE_FIELDS, FeatureSetIdentity
from stages.settings import FinetuneSettings, HeadSpec, TrainConfig, known_fields

CONFIG = "config.json"
METRICS = "metrics.json"
HEAD_WEIGHTS = "head.safetensors"
FAMILIARITY = "familiarity.safetensors"  # the training features' reference (stages.familiarity); older runs lack it
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
    if not isinstance(feature_set, dict) or any(feature_set.get(k) is None for k in BACKBONE_FIELDS):
        raise PipelineError(f"{where} is damaged: 'feature_set' must name {', '.join(BACKBONE_FIELDS)}; train again")


@dataclass(frozen=True)
class TrainedOn:
    """The features a run's head was trained on: their identity, and where they came from (the store and set, the
    backbone's weights file), so that the whole model can be rebuilt from raw images."""

    identity: FeatureSetIdentity
    store: str | None = None  # None for a fine-tuned run: its features were never stored
    set: str | None = None
    weights_path: str | None = None

    def to_dict(self) -> dict:
        return {"store": self.store, "set": self.set, "weights_path": self.weights_path, **self.identity.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainedOn:
        return cls(
            FeatureSetIdentity.from_dict(values), values.get("store"), values.get("set"), values.get("weights_path")
        )


@dataclass(frozen=True)
class RunConfig:
    """A run's config.json, typed: written by train-head and finetune, checked when read, and what everything that
    rebuilds, evaluates or lists a run uses."""

    kind: str  # "head" or "finetune"
    head: HeadSpec
    classes: list[str]
    train: TrainConfig | FinetuneSettings  # the settings as run (a head's, or a fine-tune's)
    feature_set: TrainedOn
    created: str
    # The precision the run's reported metrics were measured in, and so the one it is served in (load_model,
    # predict, evaluate, export): a head's, its features'; a fine-tune's, the one it trained and validated in.
    precision: str = "fp32"
    # Which labelling the run learnt (label_source: folders, table, metadata or pattern; label_origin; label_digest):
    # one cache serves several (train-head --labels). None for runs written before it was kept.
    labels: dict | None = None

    def to_json(self) -> dict:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "head": self.head.to_json(),
            "train": self.train.to_dict(),
            "feature_set": self.feature_set.to_dict(),
        }

    @classmethod
    def from_json(cls, config: dict) -> RunConfig:
        """From config.json's content, already checked (check_config)."""
        feature_set = TrainedOn.from_dict(config["feature_set"])
        kind = config.get("kind", "head")
        settings = TrainConfig if kind == "head" else FinetuneSettings
        return cls(
            kind=kind,
            head=HeadSpec.from_json(config["head"]),
            classes=config["classes"],
            train=settings(**known_fields(settings, config.get("train", {}))),
            feature_set=feature_set,
            created=config.get("created", ""),
            precision=config.get("precision") or feature_set.identity.precision,  # runs written before it was kept
            labels=config.get("labels"),
        )

    @property
    def settings(self) -> dict:
        """What a leaderboard shows of the settings (None where the head takes none: logreg has no lr, wd, epochs)."""
        values = {k: getattr(self.train, k, None) for k in ("head", "lr", "wd", "epochs", "views", "l2")}
        if values["head"] == "logreg" and self.kind == "head":
            values.update(lr=None, wd=None, epochs=None)
        return values


@dataclass
class RunSummary:
    """A run on a leaderboard: where it is, its settings and its valid scores."""

    run: str
    head: str | None
    lr: float | None
    wd: float | None
    epochs: int | None
    views: int | None
    l2: float | None
    accuracy: float | None
    valid_loss: float | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ListedRun(RunSummary):
    """A run found on disk by `pipeline runs`."""

    kind: str
    backbone: str
    created: str
    labels: str | None = None  # which labelling: its source and digest (runs of one cache may learn several)
    task: str = "single"  # stages.tasks
    score: float | None = None  # the task's valid figure (accuracy, mAP, R^2)
    store: str | None = None  # the store its features came from
    set: str | None = None  # the feature set in it (backbone, weights, preprocessing)

    @property
    def data(self) -> tuple[str, str, str, str]:
        """What its scores are comparable within: the same store, feature set, labelling and task."""
        return (self.store or "", self.set or "", self.labels or "", self.task)


def describe_labels(labels: dict | None) -> str | None:
    """A run's labelling in a few characters: its source, and the digest of a table's or pattern's labelling."""
    if not labels:
        return None
    digest = labels.get("label_digest")
    return f"{labels.get('label_source')}" + (f"@{digest[:8]}" if digest else "")


def read_config(run_dir: Path | str) -> RunConfig:
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
    return RunConfig.from_json(config)


def check_compatible(config: RunConfig, identity: FeatureSetIdentity, set_name: str, run_dir: Path | str) -> None:
    """Refuse features of another backbone, weights or preprocessing than the run's head was trained on."""
    trained = config.feature_set.identity
    field = trained.first_difference(identity)
    if field is not None:
        raise PipelineError(
            f"{run_dir} was trained on features of {trained.backbone} ({field} {str(getattr(trained, field))[:16]}), "
            f"but set {set_name} holds {identity.backbone} ({field} {str(getattr(identity, field))[:16]}); use a "
            "store featurized with the same backbone, weights and preprocessing"
        )


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
    out: Path, weights: dict[str, dict], config: RunConfig, metrics: dict, plot_curves: Callable[[Path], None]
) -> None:
    """Write a run's files into a folder (the staging folder stages.atomic.published_folder publishes whole)."""
    write_weights(out, weights)
    write_json(out / CONFIG, seal_config(config.to_json()))
    write_json(out / METRICS, metrics)
    plot_curves(out / CURVES)


def rank_runs(runs: list[RunSummary]) -> list[RunSummary]:
    """Best first: highest valid accuracy (or the task's own figure: mAP, R^2), then lowest valid loss (runs without
    valid last)."""

    def key(r: RunSummary) -> tuple[float, float]:
        score = r.accuracy if r.accuracy is not None else getattr(r, "score", None)  # a task's own figure
        return -(score if score is not None else 0), r.valid_loss if r.valid_loss is not None else math.inf

    return sorted(runs, key=key)


def list_runs(root: Path, store: Path | None = None) -> list[ListedRun]:
    """Every run under root (head or fine-tune) with its settings and scores, grouped by what they were trained on
    (store, feature set, labelling, task: ListedRun.data) and best first within a group; folders that are no whole
    run (damaged, unfinished) are left out."""
    rows = []
    for config_path in sorted(Path(root).rglob(CONFIG)):
        try:
            config = read_config(config_path.parent)
            metrics = json.loads((config_path.parent / METRICS).read_text())
        except (OSError, ValueError, PipelineError):
            continue
        if store is not None and config.feature_set.store != str(store.resolve()):
            continue
        rows.append(
            ListedRun(
                run=str(config_path.parent),
                **config.settings,
                accuracy=metrics.get("accuracy"),
                valid_loss=metrics.get("valid_loss"),
                kind=config.kind,
                backbone=config.feature_set.identity.backbone,
                created=config.created,
                labels=describe_labels(config.labels),
                task=metrics.get("task", "single"),
                score=metrics.get("score", metrics.get("accuracy")),
                store=config.feature_set.store,
                set=config.feature_set.set,
            )
        )
    return [run for data in sorted({r.data for r in rows}) for run in rank_runs([r for r in rows if r.data == data])]
