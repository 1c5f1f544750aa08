"""PNG plots where a picture says more than a table: training curves, the lr-find curve, calibration, confusion,
precision-recall and predicted-vs-true."""

from __future__ import annotations

from pathlib import Path

# Figures are built as objects and saved by file name (Agg renders a PNG): no pyplot, no process-wide backend.


def _figure(**kwargs):
    """A matplotlib Figure; matplotlib is imported here because only commands that draw should pay its 0.6 s."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _score_key(row: dict, prefix: str) -> str:
    """The task's figure in a history row (stages.tasks: accuracy, map or r2), by its prefix."""
    return next((prefix + k for k in ("accuracy", "map", "r2") if prefix + k in row), prefix + "accuracy")


def plot_training_curves(history: list[dict], step_losses: list[float], path: Path) -> Path:
    """Train loss per step and valid loss per epoch on the left, valid accuracy per epoch on the right."""
    fig = _figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    steps_per_epoch = len(step_losses) / max(1, len(history))
    left.plot(
        [(i + 1) / steps_per_epoch for i in range(len(step_losses))], step_losses, label="train loss (step)", alpha=0.7
    )
    epochs = [row["epoch"] + 1 for row in history]
    score = _score_key(history[0] if history else {}, "")
    if history and "valid_loss" in history[0]:
        left.plot(epochs, [row["valid_loss"] for row in history], "o-", label="valid loss")
        right.plot(epochs, [row[score] for row in history], "o-", color="tab:green")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.set(xlabel="epoch", ylabel=score, title=f"valid {score}")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_cv_path(path: list[dict], chosen: float | None, out: Path) -> Path:
    """logreg's cross-validation: out-of-fold loss and accuracy against the L2 strength, the choice marked."""
    fig = _figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    strengths = [row["l2"] for row in path]
    left.plot(strengths, [row["cv_loss"] for row in path], "o-")
    score = _score_key(path[0] if path else {}, "cv_")
    right.plot(strengths, [row[score] for row in path], "o-", color="tab:green")
    for ax, label in ((left, "out-of-fold loss"), (right, f"out-of-fold {score.removeprefix('cv_')}")):
        ax.set_xscale("log")
        ax.set(xlabel="L2 strength", ylabel=label)
        ax.grid(alpha=0.3)
        if chosen:
            ax.axvline(chosen, color="tab:purple", linestyle="--", label=f"chosen: {chosen:.2g}")
            ax.legend()
    fig.suptitle("logreg: k-fold cross-validation on the training split")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def plot_lr_find(result, path: Path) -> Path:  # result: stages.head.LrFindResult
    """Held-out and train loss of a fresh head per learning rate, on a log axis, the suggestion marked."""
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(result.lrs, result.held_out_loss, "o-", label="held-out loss (a fold of train)")
    ax.plot(result.lrs, result.train_loss, "o-", alpha=0.4, label="train loss (last epoch)")
    ax.axvline(
        result.suggestion,
        color="tab:purple",
        linestyle="--",
        label=f"suggestion (--lr auto): {result.suggestion:.2e}",
    )
    ax.set_xscale("log")
    finite = [v for v in result.held_out_loss + result.train_loss if v == v and v != float("inf")]
    if finite:
        ax.set_ylim(0, min(max(finite), 4 * max(min(finite), 1e-3)) * 1.1)
    ax.set(
        xlabel="learning rate",
        ylabel="cross-entropy",
        title=f"lr-find: a fresh head per rate, {result.epochs} epoch(s) each",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_reliability(bins: list[dict], ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is honest), image counts below."""
    fig = _figure(figsize=(5.5, 6.5))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    top.bar(
        [b["low"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    top.bar(
        [b["low"] for b in filled],
        [b["confidence"] - b["accuracy"] for b in filled],
        width=width,
        bottom=[b["accuracy"] for b in filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfectly calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability: ECE {ece:.4f} ({len(bins)} bins)")
    top.legend(loc="upper left")
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", edgecolor="black")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
    bottom.set_yscale("symlog")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_risk_coverage(shares, accuracies, marks: dict[float, float], path: Path) -> Path:
    """Selective classification: accuracy over the most confident images against the share answered."""
    fig = _figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.plot(shares, accuracies, label="accuracy of the most confident")
    for share, accuracy in marks.items():
        ax.plot([share], [accuracy], "o", label=f"{accuracy:.3f} at {share:.0%} answered")
    ax.set(xlabel="share of images answered (most confident first)", ylabel="accuracy", xlim=(0, 1))
    ax.set_title("risk-coverage: answer the confident, defer the rest")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """Counts of true (rows) against predicted (columns) classes."""
    import numpy as np

    m = np.asarray(matrix)
    size = max(4, 0.6 * len(classes) + 2)
    fig = _figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _thumbnail(source: Path | bytes | None, size: int = 160):
    """A thumbnail of an image file (a path, or bytes already read); grey when there is none or it cannot be read."""
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            return image
    except Exception:
        return Image.new("RGB", (size, size), (128, 128, 128))


def plot_image_grid(items: list[tuple[Path | bytes | None, str]], path: Path, title: str, columns: int = 3) -> Path:
    """Images (paths, or bytes already read; None draws a grey tile) with a caption each (fastai's plot_top_losses)."""
    rows = max(1, -(-len(items) // columns))
    fig = _figure(figsize=(3.2 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, caption) in zip(axes.flat, items):
        ax.imshow(_thumbnail(image_path))
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the first row
    fig.savefig(path, dpi=100)
    return path


def plot_contact_sheet(samples: dict[str, list[Path]], path: Path, per_row: int = 8) -> Path:
    """One labelled row of sample images per class."""
    rows = max(1, len(samples))
    fig = _figure(figsize=(1.6 * per_row, 1.8 * rows))
    axes = fig.subplots(rows, per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, paths) in enumerate(samples.items()):
        axes[r, 0].set_title(name, loc="left", fontsize=10, fontweight="bold")
        for c, image_path in enumerate(paths[:per_row]):
            axes[r, c].imshow(_thumbnail(image_path, 128))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_feature_map(points, labels, classes: list[str], marks: dict[str, list[int]], path: Path) -> Path:
    """A 2-D map of the images coloured by class (grey: unlabelled), flagged rows marked by kind."""
    from matplotlib import colormaps

    fig = _figure(figsize=(8, 7))
    ax = fig.subplots()
    colours = colormaps.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(*points[unlabelled].T, s=6, c="lightgrey", label="unlabelled")
    for c, name in enumerate(classes):
        ax.scatter(*points[labels == c].T, s=6, color=colours(c % colours.N), alpha=0.6, label=name)
    for (kind, rows), (marker, colour) in zip(marks.items(), (("x", "red"), ("o", "black"), ("^", "purple"))):
        if rows:
            style = {"color": colour} if marker == "x" else {"facecolors": "none", "edgecolors": colour}
            ax.scatter(*points[rows].T, s=40, marker=marker, linewidths=1, label=f"{kind} ({len(rows)})", **style)
    ax.set(
        xlabel="principal component 1", ylabel="principal component 2", title="features, first two principal components"
    )
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_precision_recall(curves: dict[str, tuple], ap: dict[str, float | None], thresholds: dict, path: Path) -> Path:
    """A multi-label head per class: precision against recall as the cut falls, its AP, and where the head's own
    threshold lands."""
    fig = _figure(figsize=(6, 5))
    ax = fig.subplots()
    for name, (precision, recall, at) in curves.items():
        label = f"{name} (AP {ap[name]:.3f})" if ap.get(name) is not None else f"{name} (no positive)"
        (line,) = ax.step(recall, precision, where="post", label=label)
        if at is not None:
            ax.plot([at[1]], [at[0]], "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="precision-recall per class")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_predicted_vs_true(truth, predicted, r2: float, path: Path) -> Path:
    """A numeric head: each image's prediction against its true value, the diagonal being perfect."""
    fig = _figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(truth, predicted, s=8, alpha=0.6)
    low, high = float(min(min(truth), min(predicted))), float(max(max(truth), max(predicted)))
    ax.plot([low, high], [low, high], "--", color="gray", label="perfect")
    ax.set(xlabel="true", ylabel="predicted", title=f"predicted vs true (R² {r2:.3f})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
