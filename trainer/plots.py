"""The training figures people look at: loss/accuracy curves and the confusion matrix.

Figures are made with ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot): no display
is needed and no global figure state is left behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_confusion_matrix", "plot_training_curves"]


def plot_training_curves(
    history: dict[str, list[float]],
    path: Path,
    *,
    best_epoch: int,
    overfit_epoch: int | None = None,
) -> Path:
    """Loss and accuracy per epoch, training vs validation, with the best epoch marked.

    Args:
        history: Keras ``History.history`` (``loss``, ``val_loss``, ``accuracy``,
            ``val_accuracy``).
        path: PNG file to write.
        best_epoch: 1-based epoch whose weights were kept (lowest validation loss).
        overfit_epoch: 1-based epoch where validation loss began to rise while training loss
            fell, shaded from there on. Defaults to None (not seen).
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric, title in zip(
        fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy"), strict=True
    ):
        ax.plot(epochs, history[metric], "o-", ms=3, label="training")
        ax.plot(epochs, history[f"val_{metric}"], "o-", ms=3, label="validation")
        ax.axvline(best_epoch, color="green", ls="--", label=f"best epoch ({best_epoch})")
        if overfit_epoch is not None:
            ax.axvspan(overfit_epoch, epochs[-1], color="red", alpha=0.08,
                       label=f"overfitting from epoch {overfit_epoch}")  # fmt: skip
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """Counts of true (rows) vs predicted (columns) classes on the test split, as a PNG."""
    n = len(labels)
    fig = Figure(figsize=(1.2 * n + 2.5, 1.1 * n + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(
        xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true",
        title="Confusion matrix (test split)",
    )  # fmt: skip
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    threshold = matrix.max() / 2
    for i in range(n):
        for j in range(n):
            colour = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour)
    fig.savefig(path, dpi=100)
    return path
