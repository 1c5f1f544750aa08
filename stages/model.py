"""The full image-to-class model rebuilt from a run directory: backbone, head and preprocessing in one object."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.backbones import REGISTRY, Backbone, create_backbone
from stages.conformal import set_names
from stages.decode import ImageDecoder, resolve_device
from stages.errors import PipelineError
from stages.familiarity import Familiarity, load_familiarity
from stages.files import read_image_file
from stages.head import Head, load_head
from stages.rundir import RunConfig, TrainedOn
from stages.runner import FeatureRunner
from stages.settings import PRECISIONS


@dataclass
class Prediction:
    """What the head's task makes of one image (stages.tasks: class probabilities, or a value), for its plain view
    and averaged over TTA views when asked."""

    path: str
    probabilities: np.ndarray
    tta_probabilities: np.ndarray | None = None
    familiarity: float | None = None  # stages.familiarity: None for a model without a reference


def decided(head: Head, outputs: np.ndarray, classes: list[str], k: int = 1) -> dict:
    """One image's prediction as a user reads it, as the head's task says (stages.tasks: the top classes; the
    classes at or above their thresholds; the value)."""
    return head.task.prediction(outputs, classes, head.decision_thresholds(), k)


class ImageClassifier:
    """Image files in, class probabilities out: the DALI decode stage, the backbone and the head."""

    def __init__(
        self,
        backbone: Backbone,
        head: Head,
        classes: list[str],
        precision: str = "fp32",
        device: str = "auto",
        batch_size: int = 32,
        measured_precision: str | None = None,
        stored_dtype: str | None = None,
        familiarity: Familiarity | None = None,
    ):
        self.backbone, self.head, self.classes = backbone, head.eval(), classes
        self.device = resolve_device(device)
        self.familiarity = familiarity.to(self.device) if familiarity is not None else None
        self.precision = precision
        self.measured_precision = measured_precision or precision  # the one the run's own metrics came from
        # A head trained on stored features saw them rounded to the store's dtype: it is served them rounded alike.
        self.stored_dtype = {"float16": torch.float16}.get(stored_dtype or "")
        self.batch_size = batch_size
        self.forward = FeatureRunner.for_backbone(backbone, self.device, precision)
        self.head.to(self.device)

    @property
    def precision_note(self) -> str | None:
        """Said when the model runs in another precision than the one its run's metrics were measured in."""
        if self.precision == self.measured_precision:
            return None
        return (
            f"running in {self.precision}, not {self.measured_precision} (the precision the run's own metrics were "
            "measured in): probabilities differ slightly from the run's"
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)

    @torch.no_grad()
    def predict_files(self, images: Images, tta: bool = False) -> Iterator[tuple[list[Prediction], list]]:
        """Per decoded batch: predictions of the images that decoded, and (key, reason) of those that did not; an
        image's key is its path, or `<image I>` for the I-th image given in memory."""
        decoder = ImageDecoder(
            self.backbone.preprocessing, device=self.device, batch_size=self.batch_size, tta=tta, num_threads=2
        )
        for batch in decoder.decode(image_items(images)):
            predictions = []
            if batch.keys:
                views = batch.images.shape[1]
                features = self.features(batch.images.flatten(0, 1))
                if self.stored_dtype is not None:
                    features = features.to(self.stored_dtype).float()
                outputs = self.head.task.activation(self.head(features))
                probs = outputs.view(len(batch.keys), views, -1).cpu().numpy()
                plain = features.view(len(batch.keys), views, -1)[:, 0]
                scores = self.familiarity(plain).tolist() if self.familiarity is not None else [None] * len(plain)
                for i, key in enumerate(batch.keys):
                    predictions.append(Prediction(key, probs[i, 0], probs[i].mean(0) if tta else None, scores[i]))
            yield predictions, batch.failed

    def familiar(self, prediction: Prediction) -> dict:
        """{familiarity, unfamiliar} of a prediction (stages.familiarity), or nothing for a model without one."""
        if prediction.familiarity is None:
            return {}
        score = prediction.familiarity
        return {"familiarity": round(score, 4), "unfamiliar": bool(self.familiarity.unfamiliar(score))}

    def prediction_set(self, probabilities: np.ndarray, coverage: float | None) -> dict:
        """{set: the classes holding the true one at that coverage (stages.conformal)}, or nothing without one."""
        if coverage is None:
            return {}
        chosen = self.head.prediction_sets(probabilities[None], coverage)[0]
        return {"set": set_names(probabilities, chosen, self.classes)}

    def predict_proba(self, images: Images, tta: bool = False) -> np.ndarray:
        """(N, C) class probabilities (or a multi-label head's per class, a numeric head's values), a row per image
        in the order given: paths, PIL images, or uint8 RGB arrays (one (H, W, 3) or a batch (N, H, W, 3)); a row of
        NaN for a file that could not be read."""
        items = image_items(images)
        rows: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(items):
            rows.setdefault(key, []).append(i)
        out = np.full((len(items), self.head.task.outputs(len(self.classes))), np.nan, np.float32)
        for predictions, _ in self.predict_files(items, tta):
            for p in predictions:
                out[rows[p.path].pop(0)] = p.tta_probabilities if tta else p.probabilities
        return out

    def predict(self, paths: Images, top_k: int = 1, tta: bool = False, coverage: float | None = None) -> list[dict]:
        """[{path, class, probability, top_k: [(class, p)...], probabilities, familiarity, unfamiliar}] per file
        (multi-label: {path, labels, probabilities, ...}; numeric: {path, value, ...}), with `coverage` each
        image's prediction set ({set: [classes]}); unreadable files carry an 'error'."""
        results = []
        for predictions, failed in self.predict_files(paths, tta):
            for p in predictions:
                probs = p.tta_probabilities if tta else p.probabilities
                answer = decided(self.head, probs, self.classes, top_k)
                results.append({"path": p.path, **answer, **self.familiar(p), **self.prediction_set(probs, coverage)})
            results += [{"path": path, "error": reason} for path, reason in failed]
        return results


Images = Iterable | np.ndarray | str | Path  # paths, PIL images, uint8 RGB arrays, or one of them


def image_items(images: Images) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(key, load) per image for the decoder: a file's bytes, or an image in memory encoded losslessly (PNG), so
    that every image goes through the same decode, resize and crop. Already made items pass through."""
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "save"):
        images = [images]
    flat = []  # a batch array (N, H, W, 3) is N images, alone or in a list
    for image in images:
        flat += list(image) if isinstance(image, np.ndarray) and image.ndim == 4 else [image]
    items = []
    for i, image in enumerate(flat):
        if isinstance(image, tuple):
            items.append(image)
        elif isinstance(image, (str, Path)):
            items.append((str(image), lambda path=Path(image): read_image_file(path)[0]))
        else:
            items.append((f"<image {i}>", lambda image=image: _png(image)))
    return items


def _png(image) -> np.ndarray:
    """A PIL image or a uint8 (H, W, 3) RGB array as PNG bytes."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise PipelineError(
                f"an image array must be uint8 RGB, (H, W, 3) or a batch (N, H, W, 3); got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        image = Image.fromarray(image)
    elif not hasattr(image, "save"):
        raise PipelineError(f"an image must be a path, a PIL image or a uint8 array; got {type(image).__name__}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def backbone_for(trained: TrainedOn, run_dir: Path) -> Backbone:
    """The backbone a head was trained on (its recorded weights file, else the packaged weights), checked against
    the weights hash recorded at training time."""
    identity, weights = trained.identity, trained.weights_path
    name = identity.backbone
    if not weights or not Path(weights).is_file():
        if name not in REGISTRY:
            raise PipelineError(
                f"{run_dir} needs the backbone weights {weights or '(unrecorded)'}, which are "
                "missing; restore them or retrain"
            )
        weights = None
    arch = identity.arch if name not in REGISTRY else None
    backbone = create_backbone(name if name in REGISTRY else "", weights, arch)
    if backbone.weights_sha256 != identity.weights_sha256:
        raise PipelineError(
            f"the weights of {name} ({backbone.weights_path}) differ from those {run_dir} was trained "
            f"on (sha256 {identity.weights_sha256[:12]}); reinstall them or retrain"
        )
    return backbone


def load_run(run_dir: str | Path) -> tuple[Backbone, Head, RunConfig]:
    """The backbone, head and config of a directory written by train-head or finetune."""
    run_dir = Path(run_dir)
    head, config = load_head(run_dir)
    return backbone_for(config.feature_set, run_dir), head, config


def load_model(
    run_dir: str | Path, device: str = "auto", batch_size: int = 32, precision: str | None = None
) -> ImageClassifier:
    """Rebuild the full image-to-class model from a directory written by train-head or finetune, in the precision
    its metrics were measured in (RunConfig.precision) unless `precision` says otherwise."""
    backbone, head, config = load_run(run_dir)
    if precision is not None and precision not in PRECISIONS:
        raise PipelineError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return ImageClassifier(
        backbone,
        head,
        config.classes,
        precision=config.precision if precision in (None, "auto") else precision,
        device=device,
        batch_size=batch_size,
        measured_precision=config.precision,
        stored_dtype=config.feature_set.identity.dtype if config.kind == "head" else None,
        familiarity=load_familiarity(run_dir),
    )
