"""What a run reports: ``metrics.jsonl``, ``curves.png``, TensorBoard events, confusion matrices.

Every file is rewritten atomically, so a reader (or a crash) never sees half of one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..extras import MissingExtra, require
from ..fileio import atomic_write

log = logging.getLogger(__name__)

SCALARS = ("train_loss", "val_loss", "train_top1", "val_top1", "val_top5", "lr", "images_per_s")


def open_tensorboard(log_dir: Path, start_epoch: int, wanted: bool | None):
    """A TensorBoard ``SummaryWriter`` for ``log_dir``, or None.

    ``wanted``: True requires the ``tensorboard`` extra (a missing one is a one-line error), None
    uses it when installed, False never.
    """
    if wanted is False:
        return None
    try:
        require("tensorboard", "tensorboard", "TensorBoard logging")
    except MissingExtra as e:
        if wanted:
            raise
        log.info("no TensorBoard events: %s", e)
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=start_epoch + 1)


def write_metrics(out: Path, history: list[dict[str, Any]], writer=None) -> None:
    """``metrics.jsonl`` and ``curves.png`` rewritten from the whole history; the last epoch to TensorBoard."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write(out / "metrics.jsonl", lambda f: f.write(text), mode="w")
    plot_curves(history, out / "curves.png")
    if writer is not None:
        m = history[-1]
        for key in SCALARS:
            writer.add_scalar(key, m[key], m["epoch"])
        writer.flush()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, as a PNG."""
    plt = _pyplot()
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: str | Path) -> None:
    """A confusion-matrix PNG (rows: true class, columns: predicted)."""
    plt = _pyplot()
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
