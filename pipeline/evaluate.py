"""predict and evaluate: a trained model on new images, and its scores with plots on a labelled split."""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.plots import (
    plot_confusion_matrix,
    plot_image_grid,
    plot_precision_recall,
    plot_predicted_vs_true,
    plot_reliability,
    plot_risk_coverage,
)
from stages.atomic import atomic_csv, output_folder, write_json
from stages.conformal import accuracy_at, risk_coverage, set_names
from stages.errors import PipelineError
from stages.familiarity import Familiarity, Separation, load_familiarity, separation
from stages.files import IMAGE_EXTENSIONS, class_folders, find_images
from stages.labels import LabelOptions, recorded_options
from stages.metrics import ClassificationMetrics, classification_metrics, top_losses
from stages.model import ImageClassifier, decided, load_model
from stages.rundir import check_compatible, read_config
from stages.tasks import precision_recall


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, folders walked recursively for images; a missing input is an error naming it."""
    files = []
    for item in inputs:
        if item.is_dir():
            files += find_images(item)
        elif item.exists():
            files.append(item)
        else:
            raise PipelineError(f"input {item} does not exist; give image files or folders")
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(str, inputs))} ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


@dataclass
class PredictResult:
    """Predictions of every image that decoded ({path, class, probability, top_k, probabilities, familiarity,
    unfamiliar} and, with TTA, the same prefixed tta_), the files that did not ({path, error}), the speed and where
    every input went."""

    predictions: list[dict]
    errors: list[dict]
    seconds: float
    images_per_second: float | None
    out: str | None
    precision: str  # the forward pass's
    precision_note: str | None  # set when it is not the run's own (an explicit --precision)
    unfamiliar: int = 0  # predictions flagged unlike the training images (stages.familiarity)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EvaluateResult:
    """A model's metrics on a labelled split, with what it was and where its plots and metrics.json went."""

    metrics: ClassificationMetrics
    run: str
    split: str
    tta: bool
    from_store: bool
    unreadable: list[dict]  # {path, error}
    seconds: float
    top_losses: list[dict]  # {path, true, predicted, probability}, the most confidently wrong first
    confusion_png: str
    top_losses_png: str
    reliability_png: str
    metrics_json: str
    precision: str  # the forward pass's (with --store: the cached features')
    precision_note: str | None  # set when it is not the run's own (an explicit --precision)
    familiarity: FamiliarityReport | None = None
    predictions_csv: str | None = None  # every evaluated image: path, true, predicted, probabilities, familiarity
    # per coverage asked (stages.conformal.COVERAGES): {coverage, empirical, mean_size}; None without conformity scores
    coverage: list[dict] | None = None
    selective: dict | None = None  # accuracy_at_90, accuracy_at_95: accuracy over the most confident 90 %, 95 %
    risk_coverage_png: str | None = None

    def to_json(self) -> dict:
        data = {**self.metrics.to_json(), **asdict(self)}
        del data["metrics"]
        return data


def predict(
    model: ImageClassifier,
    inputs: list[Path],
    top_k: int = 1,
    tta: bool = False,
    out: Path | None = None,
    coverage: float | None = None,
) -> PredictResult:
    """Predictions for every input image (with `coverage`, each one's prediction set); every input to .csv or .json
    when out is given."""
    if top_k < 1:
        raise PipelineError(f"--top-k {top_k} is out of range; give 1 or more")
    if coverage is not None:  # refused before any decoding when the head cannot
        model.head.coverage_cut(coverage)
    if out is not None and out.suffix not in (".csv", ".json"):
        raise PipelineError(f"--out {out} must end in .csv or .json")
    files = expand_inputs(inputs)
    started = time.perf_counter()
    rows, errors = [], []
    for predictions, failed in model.predict_files(files, tta=tta):
        for p in predictions:
            row = {"path": p.path, **decided(model.head, p.probabilities, model.classes, top_k)}
            if tta:
                tta_row = decided(model.head, p.tta_probabilities, model.classes, top_k)
                row.update({f"tta_{k}": v for k, v in tta_row.items()})
            rows.append({**row, **model.familiar(p), **model.prediction_set(p.probabilities, coverage)})
        errors += [{"path": path, "error": reason} for path, reason in failed]
    seconds = time.perf_counter() - started
    if out is not None:
        _write_predictions(out, rows, errors, model, tta)
    return PredictResult(
        predictions=rows,
        errors=errors,
        seconds=round(seconds, 3),
        images_per_second=round(len(rows) / seconds, 1) if rows else None,
        out=str(out) if out else None,
        precision=model.precision,
        precision_note=model.precision_note,
        unfamiliar=sum(bool(r.get("unfamiliar")) for r in rows),
    )


def _write_predictions(out: Path, rows: list[dict], errors: list[dict], model: ImageClassifier, tta: bool) -> None:
    """Every input, predicted or not, to JSON, or to CSV in the task's columns (stages.tasks), the same again prefixed
    tta_, familiarity and unfamiliar where the model has a reference, the prediction set (space-separated) when
    asked, and the reason a file could not be read."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        write_json(out, rows + errors)
        return
    task, classes = model.head.task, model.classes
    prefixes = ["", "tta_"] if tta else [""]
    extra = ["familiarity", "unfamiliar"] if model.familiarity is not None else []
    extra += ["set"] if rows and "set" in rows[0] else []
    columns = [p + column for p in prefixes for column in task.csv_columns(classes)]
    with atomic_csv(out) as f:
        writer = csv.writer(f)
        writer.writerow(["path", *columns, *extra, "error"])
        for r in rows:
            cells = [cell for p in prefixes for cell in task.csv_cells(r, classes, p)]
            writer.writerow([r["path"], *cells, *(" ".join(r[k]) if k == "set" else r[k] for k in extra), ""])
        for e in errors:
            writer.writerow([e["path"], *[""] * (len(columns) + len(extra)), e["error"]])


def labelled_split(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Images of a folder of class folders, labelled with the model's class indices; other names are an error."""
    if not split_dir.is_dir():
        raise PipelineError(f"split folder {split_dir} does not exist; give a folder of class folders")
    folders = class_folders(split_dir)
    unknown = [f for f in folders if f not in classes]
    if unknown or not folders:
        raise PipelineError(
            f"class folders of {split_dir} ({', '.join(folders) or 'none'}) do not match the model's "
            f"classes ({', '.join(classes)}); give a split with the classes the model was trained on"
        )
    files, labels = [], []
    for name in folders:
        images = find_images(split_dir / name)
        files += images
        labels += [classes.index(name)] * len(images)
    if not files:
        raise PipelineError(f"{split_dir} holds no images")
    return files, np.asarray(labels)


def _cached_outputs(head, familiarity: Familiarity | None, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (the head's task's activation) and familiarity scores (None without a reference) of cached
    features."""
    x = torch.from_numpy(x).float()
    with torch.no_grad():
        return head.task.activation(head(x)).numpy(), familiarity(x).numpy() if familiarity is not None else None


def _store_split(
    head, familiarity, config, run_dir: Path, store: Path, split: str, label_options: LabelOptions | None
) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray | None]:
    """A split of a store as evaluate reads it: each image's path (in the data folder), label in the run's classes,
    probabilities and familiarity from its cached plain view."""
    from store import FeatureStore

    with FeatureStore(store) as opened:
        trained_here = config.feature_set.store == str(store.resolve())
        feature_set = opened.feature_set(config.feature_set.set if trained_here else None).with_labels(label_options)
        check_compatible(config, feature_set.identity, feature_set.name, run_dir)
        plain = np.flatnonzero(feature_set.column(split, "view") == 0)
        stored = feature_set.column(split, "labels")[plain]
        unknown = sorted({feature_set.classes[i] for i in stored if i >= 0} - set(config.classes))
        if unknown or (stored < 0).any():
            what = f"classes the run does not know ({', '.join(unknown[:5])})" if unknown else "unlabelled images"
            raise PipelineError(
                f"store {store} {split} holds {what}; evaluate a split labelled with the run's classes "
                f"({', '.join(config.classes)}), or give --labels"
            )
        labels = np.asarray([config.classes.index(feature_set.classes[i]) for i in stored], np.int64)
        probabilities, scores = _cached_outputs(head, familiarity, feature_set.features(split)[plain])
        data_dir = Path(feature_set.record.data_dir or ".")
        files = [data_dir / p for p in np.asarray(feature_set.column(split, "paths"), dtype=object)[plain]]
    if not len(files):
        raise PipelineError(f"store {store} holds no {split} images to evaluate")
    return files, labels, probabilities, scores


@dataclass
class CachedPredictions:
    """A split's predictions from the store's cached features (fastai's get_preds): per image its path (in the data
    folder), class probabilities (N, C, columns in `classes` order), target class and familiarity."""

    paths: list[Path]
    probabilities: np.ndarray
    targets: np.ndarray
    familiarity: np.ndarray | None
    classes: list[str]


def get_preds(
    run_dir: str | Path, store: str | Path, split: str = "valid", labels: LabelOptions | None = None
) -> CachedPredictions:
    """A single-label run's probabilities and the targets of a split of a store, from its cached plain views: no
    decoding, no backbone (the store must hold features of the run's backbone, weights and preprocessing)."""
    from stages.head import load_head

    run_dir, store = Path(run_dir), Path(store)
    head, config = load_head(run_dir)
    if head.task.name != "single":
        raise PipelineError(f"{run_dir} is a {head.task.name} head; get_preds serves single-label runs")
    files, targets, probabilities, scores = _store_split(
        head, load_familiarity(run_dir), config, run_dir, store, split, labels
    )
    return CachedPredictions(files, probabilities, targets, scores, config.classes)


def _outputs_from_store(
    head, familiarity, config, run_dir: Path, store: Path, files: list[Path]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and familiarity of the files from cached view-0 features; every file must be in the store."""
    from store import FeatureStore

    with FeatureStore(store) as opened:
        trained_here = config.feature_set.store == str(store.resolve())
        feature_set = opened.feature_set(config.feature_set.set if trained_here else None)
        check_compatible(config, feature_set.identity, feature_set.name, run_dir)
        data_dir = Path(feature_set.record.data_dir or ".").resolve()
        position = {}
        for i, f in enumerate(files):
            if f.resolve().is_relative_to(data_dir):
                position[f.resolve().relative_to(data_dir).as_posix()] = i
        probabilities = np.full((len(files), len(config.classes)), np.nan)
        scores = np.full(len(files), np.nan) if familiarity is not None else None
        for split in feature_set.splits:
            paths, views = feature_set.column(split, "paths"), feature_set.column(split, "view")
            rows = np.asarray(
                [(row, position[p]) for row, (p, v) in enumerate(zip(paths, views)) if v == 0 and p in position]
            ).reshape(-1, 2)
            if len(rows):
                found, familiar = _cached_outputs(head, familiarity, feature_set.features(split)[rows[:, 0]])
                probabilities[rows[:, 1]] = found
                if scores is not None:
                    scores[rows[:, 1]] = familiar
    missing = np.flatnonzero(np.isnan(probabilities[:, 0]))
    if len(missing):
        raise PipelineError(
            f"store {store} does not hold {files[missing[0]]} (it was featurized from {data_dir}); "
            "featurize that folder first or evaluate without --store"
        )
    return probabilities, scores


def evaluate(
    run_dir: Path,
    split_dir: Path,
    out: Path | None = None,
    tta: bool = False,
    store: Path | None = None,
    device: str = "auto",
    precision: str | None = None,
    split: str = "valid",
    labels: LabelOptions | None = None,
    ood: Path | None = None,
) -> EvaluateResult | TaskEvaluateResult:
    """Metrics, confusion matrix and top losses of a model on a labelled split; from cached features with store.
    Without split_dir, a split of the store itself (`split`), labelled as the store holds it or by `labels`: what a
    data folder labelled by a table or a pattern has no class folders for. The model runs in the precision its
    run's metrics were measured in, unless `precision` says otherwise."""
    out = out or run_dir / "eval"
    if store is not None and precision is not None:
        raise PipelineError("--precision applies to the backbone; drop it with --store (the features are cached)")
    if split_dir is None and store is None:
        raise PipelineError("give a SPLIT_DIR of class folders, or --store STORE to evaluate a split it holds")
    task = read_config(run_dir).head.task
    if ood is not None and not ood.is_dir():
        raise PipelineError(f"--ood {ood} is not a folder; give a folder of images unlike the training images")
    if ood is not None and task != "single":
        raise PipelineError(f"--ood applies to single-label heads; {run_dir} is a {task} head")
    if task != "single":  # several labels or a number: no class folders say them, the store's split (its table) does
        if split_dir is not None or store is None or tta:
            raise PipelineError(
                f"{run_dir} is a {task} head: evaluate it on a split of its store, --store STORE [--split valid] "
                "[--labels FILE], without SPLIT_DIR or --tta"
            )
        with output_folder(out, (PR_PNG, PVT_PNG), "an evaluation") as staging:
            return _evaluate_task(run_dir, out, staging, store, split, labels)
    # Held from the start (a second evaluate into the same folder is refused at once), published whole at the end.
    with output_folder(out, (CONFUSION_PNG,), "an evaluation") as staging:
        return _evaluate(run_dir, split_dir, out, staging, tta, store, device, precision, split, labels, ood)


@dataclass
class TaskEvaluateResult:
    """A multi-label or numeric head's figures on a split of its store (stages.tasks: mAP, micro and macro F1,
    per-class AP, subset accuracy; or MAE, RMSE, R^2), with its picture (precision-recall per class, or predicted
    against true) and where metrics.json went."""

    task: str
    metrics: dict
    images: int
    run: str
    split: str
    seconds: float
    plot_png: str
    metrics_json: str

    def to_json(self) -> dict:
        return asdict(self)


PR_PNG, PVT_PNG = "precision_recall.png", "predicted_vs_true.png"


def _evaluate_task(
    run_dir: Path, out: Path, staging: Path, store: Path, split: str, label_options: LabelOptions | None
) -> TaskEvaluateResult:
    """A multi-label or numeric head on the plain views of a split of its store, labelled by the table the run
    recorded (or --labels)."""
    from stages.head import load_head
    from store import FeatureStore

    started = time.perf_counter()
    head, config = load_head(run_dir)
    task = head.task
    with FeatureStore(store) as opened:
        trained_here = config.feature_set.store == str(store.resolve())
        feature_set = opened.feature_set(config.feature_set.set if trained_here else None)
        check_compatible(config, feature_set.identity, feature_set.name, run_dir)
        given = label_options is not None and label_options.given
        feature_set = feature_set.with_labels(label_options if given else recorded_options(config.labels))
        if feature_set.task != task.name or (task.name == "multi" and feature_set.classes != config.classes):
            raise PipelineError(
                f"store {store} is labelled for another task ({feature_set.task}: {', '.join(feature_set.classes)}) "
                f"than the run's ({task.name}: {', '.join(config.classes)}); give --labels with the run's labels"
            )
        plain = np.flatnonzero(feature_set.column(split, "view") == 0)
        targets = feature_set.column(split, "labels")[plain]
        x = torch.from_numpy(feature_set.features(split)[plain]).float()
    if not len(plain):
        raise PipelineError(f"store {store} holds no {split} images to evaluate")
    with torch.no_grad():
        outputs = task.activation(head(x)).numpy()
    thresholds = head.decision_thresholds()
    figures = task.metrics(outputs, targets, thresholds)
    if task.name == "multi":
        names = config.classes
        if head.conformity.numel():  # per class: the images carrying it whose set holds it (stages.conformal)
            figures["coverage"] = task.coverage_table(outputs, targets, head.conformity.numpy())
        figures["per_class_ap"] = {names[c]: v for c, v in figures["per_class_ap"].items()}
        figures["thresholds"] = dict(zip(names, thresholds.tolist()))
        curves = {}
        for c, name in enumerate(names):
            precision, recall, _ = precision_recall(targets[:, c], outputs[:, c])
            decided = outputs[:, c] >= thresholds[c]
            hits = int((decided & targets[:, c].astype(bool)).sum())
            at = (hits / max(1, decided.sum()), hits / max(1, targets[:, c].sum()))
            curves[name] = (np.r_[1.0, precision], np.r_[0.0, recall], at)
        plot = plot_precision_recall(curves, figures["per_class_ap"], figures["thresholds"], staging / PR_PNG)
    else:
        plot = plot_predicted_vs_true(targets, task.decide(outputs), figures["r2"], staging / PVT_PNG)
    result = TaskEvaluateResult(
        task=task.name,
        metrics=figures,
        images=len(plain),
        run=str(run_dir),
        split=f"{store}:{split}",
        seconds=round(time.perf_counter() - started, 3),
        plot_png=str(out / plot.name),
        metrics_json=str(out / METRICS_JSON),
    )
    write_json(staging / METRICS_JSON, result.to_json())
    return result


CONFUSION_PNG, RELIABILITY_PNG, TOP_LOSSES_PNG, METRICS_JSON, PREDICTIONS_CSV, RISK_COVERAGE_PNG = (
    "confusion.png",
    "reliability.png",
    "top_losses.png",
    "metrics.json",
    "predictions.csv",
    "risk_coverage.png",
)
CSV_COVERAGE = 0.9  # the coverage of the prediction set predictions.csv gives each image


def _evaluate(
    run_dir: Path,
    split_dir: Path,
    out: Path,
    staging: Path,
    tta: bool,
    store: Path | None,
    device: str,
    precision: str | None,
    split: str = "valid",
    label_options: LabelOptions | None = None,
    ood: Path | None = None,
) -> EvaluateResult:
    from stages.head import load_head

    started = time.perf_counter()
    head, config = load_head(run_dir)
    familiarity = load_familiarity(run_dir)
    if ood is not None and familiarity is None:
        raise PipelineError(f"{run_dir} carries no familiarity reference (trained before models had one); train again")
    classes = config.classes
    failed, model = [], None
    if split_dir is None:  # a split of the store, its rows and labels as it holds them (or as --labels says)
        if tta:
            raise PipelineError("--tta needs raw images; give a SPLIT_DIR to evaluate with TTA")
        files, labels, probabilities, scores = _store_split(
            head, familiarity, config, run_dir, store, split, label_options
        )
        used, note = config.precision, None
    elif store is not None:  # cached features: the head alone, no backbone to build
        files, labels = labelled_split(split_dir, classes)
        if tta:
            raise PipelineError("--tta needs raw images; drop --store to evaluate with TTA")
        probabilities, scores = _outputs_from_store(head, familiarity, config, run_dir, store, files)
        used, note = config.precision, None
    else:
        files, labels = labelled_split(split_dir, classes)
        model = load_model(run_dir, device=device, precision=precision)
        used, note = model.precision, model.precision_note
        by_path = {}
        for predictions, bad in model.predict_files(files, tta=tta):
            for p in predictions:
                by_path[p.path] = (p.tta_probabilities if tta else p.probabilities, p.familiarity)
            failed += [{"path": path, "error": reason} for path, reason in bad]
        keep = [i for i, f in enumerate(files) if str(f) in by_path]
        probabilities = np.stack([by_path[str(files[i])][0] for i in keep])
        scores = np.asarray([by_path[str(files[i])][1] for i in keep]) if familiarity is not None else None
        files, labels = [files[i] for i in keep], labels[keep]
    metrics = classification_metrics(labels, probabilities, classes)
    familiar = None
    if familiarity is not None:
        flagged = familiarity.unfamiliar(scores)
        unlike = (
            _unlike_images(model or load_model(run_dir, device=device), ood, scores, probabilities) if ood else None
        )
        familiar = FamiliarityReport(
            **familiarity.summary(), unfamiliar=int(flagged.sum()), unfamiliar_share=float(flagged.mean()), ood=unlike
        )
    sets, coverage = None, None
    if head.conformity.numel():  # prediction sets calibrated on training images (stages.conformal)
        coverage = head.task.coverage_table(probabilities, labels, head.conformity.numpy())
        sets = head.prediction_sets(probabilities, CSV_COVERAGE)
    shares, accuracies = risk_coverage(probabilities, labels)
    marks = {share: accuracy_at(shares, accuracies, share) for share in (0.9, 0.95)}
    plot_risk_coverage(shares, accuracies, marks, staging / RISK_COVERAGE_PNG)
    selective = {f"accuracy_at_{round(share * 100)}": accuracy for share, accuracy in marks.items()}
    _write_evaluated(staging / PREDICTIONS_CSV, files, labels, probabilities, scores, familiarity, classes, sets)
    worst = top_losses(labels, probabilities)
    captions = [
        (
            files[i],
            f"{classes[labels[i]]} -> {classes[int(probabilities[i].argmax())]} "
            f"({probabilities[i].max():.2f})\n{files[i].name}",
        )
        for i in worst
    ]
    result = EvaluateResult(
        metrics=metrics,
        run=str(run_dir),
        split=str(split_dir) if split_dir is not None else f"{store}:{split}",
        tta=tta,
        from_store=store is not None,
        unreadable=failed,
        seconds=round(time.perf_counter() - started, 3),
        top_losses=[
            {
                "path": str(files[i]),
                "true": classes[labels[i]],
                "predicted": classes[int(probabilities[i].argmax())],
                "probability": float(probabilities[i].max()),
            }
            for i in worst
        ],
        confusion_png=str(out / CONFUSION_PNG),
        top_losses_png=str(out / TOP_LOSSES_PNG),
        reliability_png=str(out / RELIABILITY_PNG),
        metrics_json=str(out / METRICS_JSON),
        precision=used,
        precision_note=note,
        familiarity=familiar,
        predictions_csv=str(out / PREDICTIONS_CSV),
        coverage=coverage,
        selective=selective,
        risk_coverage_png=str(out / RISK_COVERAGE_PNG),
    )
    plot_confusion_matrix(metrics.confusion_matrix, classes, staging / CONFUSION_PNG)
    plot_reliability(metrics.reliability, metrics.ece, staging / RELIABILITY_PNG)
    plot_image_grid(captions, staging / TOP_LOSSES_PNG, "top losses: actual -> predicted (p)")
    write_json(staging / METRICS_JSON, {k: v for k, v in result.to_json().items() if k != "metrics_json"})
    return result


CONFIDENT = 0.9  # the top probability --ood counts an unlike image as confidently classified at


@dataclass
class UnlikeImages:
    """evaluate --ood: a folder of images unlike the training images against the evaluated ones."""

    folder: str
    images: int
    familiarity: Separation  # of the familiarity score
    top_probability: Separation  # of the top probability, for comparison
    confident_unflagged: float  # share of them given p >= CONFIDENT and not flagged unfamiliar
    confident: float  # share of them given p >= CONFIDENT


@dataclass
class FamiliarityReport:
    """The evaluated images' familiarity (stages.familiarity): the run's threshold, neighbour, reference size and
    pass share, how many images fell under the threshold, and with --ood the unlike images."""

    threshold: float
    neighbour: int
    reference_images: int
    pass_share: float
    unfamiliar: int
    unfamiliar_share: float
    ood: UnlikeImages | None = None


def _unlike_images(model: ImageClassifier, folder: Path, scores: np.ndarray, probabilities: np.ndarray) -> UnlikeImages:
    """The model's familiarity and top probability on a folder of images unlike its training images, each scored by
    how well it separates them from the evaluated images (AUROC, FPR95), and the share of them that the model
    classifies confidently (top probability >= CONFIDENT) without flagging them unfamiliar."""
    unlike, top = [], []
    for predictions, _ in model.predict_files(expand_inputs([folder])):
        unlike += [p.familiarity for p in predictions]
        top += [float(p.probabilities.max()) for p in predictions]
    if not unlike:
        raise PipelineError(f"--ood {folder}: none of its images could be read; give a folder of other images")
    unlike, top = np.asarray(unlike), np.asarray(top)
    passed = ~model.familiarity.unfamiliar(unlike)
    return UnlikeImages(
        folder=str(folder),
        images=len(unlike),
        familiarity=separation(scores, unlike),
        top_probability=separation(probabilities.max(1), top),
        confident_unflagged=round(float(((top >= CONFIDENT) & passed).mean()), 4),
        confident=round(float((top >= CONFIDENT).mean()), 4),
    )


def _write_evaluated(path, files, labels, probabilities, scores, familiarity, classes, sets) -> None:
    """evaluate's per-image predictions: path, true, predicted, its probability, every class's, familiarity and
    the prediction set at CSV_COVERAGE (space-separated)."""
    familiar = ["familiarity", "unfamiliar"] if scores is not None else []
    with atomic_csv(path) as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", "true", "predicted", "probability", *classes, *familiar, *(["set"] * (sets is not None))]
        )
        for i, file in enumerate(files):
            row = [str(file), classes[labels[i]], classes[int(probabilities[i].argmax())]]
            row += [f"{probabilities[i].max():.6f}", *(f"{p:.6f}" for p in probabilities[i])]
            if scores is not None:
                row += [f"{scores[i]:.4f}", bool(familiarity.unfamiliar(scores[i]))]
            if sets is not None:
                row.append(" ".join(set_names(probabilities[i], sets[i], classes)))
            writer.writerow(row)
