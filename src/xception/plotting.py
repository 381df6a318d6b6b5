"""Every figure the project draws, written as PNG files atomically (matplotlib, Agg backend).

    curves       training loss and accuracy per epoch (``curves.png``)
    confusion    a confusion matrix
    cam_figure   an image with each class-activation map and its overlay (``xception explain``)
    gallery      images beside their overlays, captioned (the evaluation report's mistakes)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        pyplot().close(fig)
    return path


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, as a PNG."""
    plt = pyplot()
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [100 * m["train_top1"] for m in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [100 * m["val_top1"] for m in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * m["val_top5"] for m in history], "o--", label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: str | Path) -> None:
    """A confusion-matrix PNG (rows: true class, columns: predicted)."""
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 20), min(2 + 0.5 * n, 20)))
    ax.imshow(confusion, cmap="Blues")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if confusion[i][j]:
                        ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The heatmap in the jet colour map over the image (Keras's tutorial: alpha 0.4), (H, W, 3) in [0, 1]."""
    from matplotlib import colormaps

    return np.clip((1 - alpha) * image + alpha * colormaps["jet"](heatmap)[..., :3], 0, 1)


def cam_figure(path: str | os.PathLike, image: np.ndarray, rows: Sequence[str], heatmaps: dict[str, np.ndarray],
               titles: dict[str, str] | None = None, title: str | None = None) -> Path:
    """One row per explained class (``rows``: its caption): the image, then each method's heatmap and overlay."""
    plt = pyplot()
    cols = 1 + 2 * len(heatmaps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.8 * len(rows) + 0.4), squeeze=False)
    for r, caption in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(caption, fontsize=10, fontweight="bold")
        for m, (method, maps) in enumerate(heatmaps.items()):
            name = (titles or {}).get(method, method)
            axes[r, 1 + 2 * m].imshow(maps[r], cmap="jet", vmin=0, vmax=1)
            axes[r, 1 + 2 * m].set_title(f"{name} heatmap", fontsize=9)
            axes[r, 2 + 2 * m].imshow(overlay(image, maps[r]))
            axes[r, 2 + 2 * m].set_title(f"{name} overlay", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def gallery(path: str | os.PathLike, entries: Sequence[tuple[np.ndarray, str, np.ndarray, str]], *, title: str,
            per_row: int = 4, empty: str = "nothing to show") -> Path:
    """Pairs of images side by side, ``per_row`` pairs a row: ``(image, caption, overlay, caption)``
    per entry, images (H, W, 3) in [0, 1]; ``empty`` is written on a figure without entries."""
    plt = pyplot()
    if not entries:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, path)
    rows = -(-len(entries) // per_row)
    cols = 2 * min(per_row, len(entries))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.7 * rows), squeeze=False)
    for n, (image, caption, shown, shown_caption) in enumerate(entries):
        ax_img, ax_cam = axes[n // per_row, 2 * (n % per_row)], axes[n // per_row, 2 * (n % per_row) + 1]
        ax_img.imshow(image)
        ax_img.set_title(caption, fontsize=8)
        ax_cam.imshow(shown)
        ax_cam.set_title(shown_caption, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
