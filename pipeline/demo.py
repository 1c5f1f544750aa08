"""The built-in demo: a generated image set of visually distinct classes, run through the whole flow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from pipeline.featurize import FeaturizeResult
    from stages.rundir import RunSummary

DEMO_CLASSES = ("disks", "stripes", "checkers")


def draw_example(kind: str, rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One synthetic photo-like image of a class: a textured background and the class's pattern."""
    w, h = size
    background = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 12, size=(h, w, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if kind == "disks":
        for _ in range(rng.integers(2, 5)):
            r = int(rng.integers(10, 30))
            x, y = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif kind == "stripes":
        step = int(rng.integers(8, 20))
        for y in range(int(rng.integers(0, step)), h, step):
            draw.rectangle((0, y, w, y + step // 2), fill=colour)
    else:
        step = int(rng.integers(10, 24))
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    return image


def make_demo_images(
    root: Path, per_class: dict[str, int] | None = None, seed: int = 0, classes: tuple[str, ...] = DEMO_CLASSES
) -> Path:
    """Write DATA/train and DATA/valid folders of generated JPEGs; existing files are kept as they are."""
    per_class = per_class or {"train": 30, "valid": 10}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for kind in classes:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = draw_example(kind, rng)
                path = folder / f"{kind}_{i:03d}.jpg"
                if not path.exists():
                    image.save(path, quality=90)
    return root


@dataclass
class DemoEvaluation:
    accuracy: float
    ece: float
    confusion_png: str
    reliability_png: str
    top_losses_png: str


@dataclass
class DemoResult:
    """What the demo made and where (demo --json): the generated images, the store, each step's result."""

    data_dir: str
    store: str
    featurize: FeaturizeResult
    lr_find: float  # the suggested learning rate
    heads: list[RunSummary]  # the leaderboard
    evaluate: DemoEvaluation
    predictions: list[dict]  # pipeline.evaluate.PredictResult's rows

    def to_json(self) -> dict:
        return {
            "data_dir": self.data_dir,
            "store": self.store,
            "featurize": self.featurize.to_json(),
            "lr_find": self.lr_find,
            "heads": [run.to_json() for run in self.heads],
            "evaluate": asdict(self.evaluate),
            "predictions": self.predictions,
        }


def run_demo(
    out_dir: Path, progress: Callable[[int, int], None] | None = None, say: Callable[[str], None] = print
) -> DemoResult:
    """The whole flow on generated images: featurize, lr-find, train-head, evaluate, predict; where everything went."""
    from pipeline.evaluate import evaluate, predict
    from pipeline.featurize import FeaturizeOptions, featurize
    from pipeline.train_head import find_lr, load_cached_features, train_grid
    from stages.model import load_model
    from stages.settings import TrainConfig
    from store import FeatureStore

    data = make_demo_images(out_dir / "data")
    say(f"1. generated images: {data} (classes {', '.join(DEMO_CLASSES)}; train 30 and valid 10 per class)")
    store = out_dir / "demo.h5"
    summary = featurize(FeaturizeOptions(data_dir=data, store=store, views=2), progress=progress)
    state = "already up to date" if summary.up_to_date else f"featurized {summary.featurized} images"
    say(f"2. feature store: {store} ({state}, {summary.seconds:.1f} s; set {summary.set})")
    with FeatureStore(store) as opened:
        cached = load_cached_features(opened)
        found = find_lr(cached, TrainConfig(head="linear", views=2), out_dir / "lr-find")
        say(f"3. lr-find (linear head): suggested lr {found.suggestion:.2e}; plot {found.plot}")
        board = train_grid(
            cached,
            [TrainConfig(views=2), TrainConfig(head="linear", lr=found.suggestion, views=2)],
            out_dir / "heads",
            overwrite=True,
        )  # the demo is rerun as a whole
    for run in board:
        setting = f"l2 {run.l2:.2g} by 5-fold cv" if run.head == "logreg" else f"lr {run.lr:.2e}"
        say(
            f"4. train-head {run.head} ({setting}): valid accuracy {run.accuracy:.4f}, log loss "
            f"{run.valid_loss:.4f}; model in {run.run}"
        )
    best = board[0].run
    evaluated = evaluate(Path(best), data / "valid", out_dir / "eval")
    say(
        f"5. evaluate {best}: accuracy {evaluated.metrics.accuracy:.4f}, calibration error "
        f"{evaluated.metrics.ece:.4f}; {evaluated.confusion_png}, {evaluated.reliability_png}, "
        f"{evaluated.top_losses_png}"
    )
    samples = [data / "valid" / kind / f"{kind}_000.jpg" for kind in DEMO_CLASSES]
    predictions = predict(load_model(best), samples).predictions
    for p in predictions:
        say(f"6. predict: {p['path']} -> {p['class']} ({p['probability']:.3f})")
    say(f"next: pipeline runs --dir {out_dir}; pipeline store info {store}")
    return DemoResult(
        data_dir=str(data),
        store=str(store),
        featurize=summary,
        lr_find=found.suggestion,
        heads=board,
        evaluate=DemoEvaluation(
            evaluated.metrics.accuracy,
            evaluated.metrics.ece,
            evaluated.confusion_png,
            evaluated.reliability_png,
            evaluated.top_losses_png,
        ),
        predictions=predictions,
    )
