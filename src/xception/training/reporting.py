"""What a run reports: ``metrics.jsonl``, ``curves.png``, TensorBoard events, confusion matrices.

Every file is rewritten atomically, so a reader (or a crash) never sees half of one.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

from ..extras import MissingExtra, require
from ..fileio import atomic_write
from ..plotting import plot_curves

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
    if "tensorflow" not in sys.modules:
        # TensorBoard writes events with its own TensorFlow stub when the module ``notf`` exists;
        # without it, an installed TensorFlow is imported just to write scalars (11 s against 2.5 s
        # on a 2-core machine). A TensorFlow the program already imported is used as before.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
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
