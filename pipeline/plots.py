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
