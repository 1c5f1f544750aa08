"""PNG plots where a picture says more than a table: training curves and the lr-find curve."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], step_losses: list[float], path: Path) -> Path:
    """Train loss per step and valid loss per epoch on the left, valid accuracy per epoch on the right."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps_per_epoch = len(step_losses) / max(1, len(history))
    left.plot([(i + 1) / steps_per_epoch for i in range(len(step_losses))], step_losses, label="train loss (step)",
              alpha=0.7)
    epochs = [row["epoch"] + 1 for row in history]
    if history and "valid_loss" in history[0]:
        left.plot(epochs, [row["valid_loss"] for row in history], "o-", label="valid loss")
        right.plot(epochs, [row["accuracy"] for row in history], "o-", color="tab:green")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    left.legend()
    right.set(xlabel="epoch", ylabel="accuracy", title="valid accuracy")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lr_find(result: dict, path: Path) -> Path:
    """Smoothed loss against learning rate on a log axis, the suggestions marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    ax.plot(result["lrs"], result["losses"], alpha=0.25, label="loss")
    for key, label, colour in (("steepest", "steepest", "tab:red"), ("minimum_div10", "minimum/10", "tab:green"),
                               ("valley", "valley (--lr auto)", "tab:purple")):
        ax.axvline(result[key], color=colour, linestyle="--", label=f"{label}: {result[key]:.2e}")
    ax.set_xscale("log")
    top = max(result["smoothed"][: max(1, len(result["smoothed"]) // 2)])
    ax.set_ylim(min(result["smoothed"]) * 0.9, top * 1.5 if top > 0 else None)
    ax.set(xlabel="learning rate", ylabel="loss", title="lr-find")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """Counts of true (rows) against predicted (columns) classes."""
    import numpy as np

    m = np.asarray(matrix)
    size = max(4, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _thumbnail(path: Path, size: int = 160):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            return image
    except Exception:
        return Image.new("RGB", (size, size), (128, 128, 128))


def plot_image_grid(items: list[tuple[Path, str]], path: Path, title: str, columns: int = 3) -> Path:
    """Images with a caption each (fastai's plot_top_losses)."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, caption) in zip(axes.flat, items):
        ax.imshow(_thumbnail(image_path))
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_contact_sheet(samples: dict[str, list[Path]], path: Path, per_row: int = 8) -> Path:
    """One labelled row of sample images per class."""
    rows = max(1, len(samples))
    fig, axes = plt.subplots(rows, per_row, figsize=(1.6 * per_row, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, paths) in enumerate(samples.items()):
        axes[r, 0].set_title(name, loc="left", fontsize=10, fontweight="bold")
        for c, image_path in enumerate(paths[:per_row]):
            axes[r, c].imshow(_thumbnail(image_path, 128))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
