"""Training checkpoints: atomic save, safe loading, and the random state for exact resume.

A checkpoint (``last.pt`` / ``best.pt``) is a plain dict that ``torch.load(weights_only=True)``
reads back without unpickling code::

    format       "xception-checkpoint" (CHECKPOINT_FORMAT)
    model_name   registry name, e.g. "xception"
    config       dataclasses.asdict(model.config)
    model        state dict of the unwrapped, uncompiled model (CPU, contiguous)
    ema          EMA state dict or None; when present, the weights to use for inference
    class_names  list[str] or None
    preprocessing  Preprocessing.to_dict() of the run (image size, crop, interpolation, mean, std)
    optimizer, scheduler, scaler      their state dicts (scaler None without fp16)
    epoch        completed epochs; step: optimizer steps so far
    epoch_step   optimizer steps done in the unfinished epoch ``epoch`` (0 at an epoch boundary)
    epoch_stats  running sums of that unfinished epoch
    rng          one dict per rank: torch, cuda, numpy and python random states
    train_config the run's settings (dict); history: the per-epoch metrics so far

``last.pt`` is written at the end of every epoch, on SIGINT/SIGTERM, and, with a save interval
(:class:`RecoverySchedule`), inside an epoch after the step at which the interval is due: a
process killed outright (SIGKILL, OOM killer, preemption) then loses at most one interval.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write, torch_load_safe
from ..weights import check_checkpoint


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically: a crash leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of ``model.state_dict()``."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our checkpoints safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return check_checkpoint(torch_load_safe(path), path)


# --- random state -----------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python random states, as weights_only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- recovery saves inside an epoch -------------------------------------------------------------

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(min|m|steps?)\s*$")


def parse_save_interval(text: str) -> tuple[str, float]:
    """``"10min"`` -> ``("minutes", 10.0)``; ``"500steps"`` -> ``("steps", 500)``."""
    found = _INTERVAL.match(str(text))
    value = float(found[1]) if found else 0.0
    unit = "steps" if found and found[2].startswith("step") else "minutes"
    if not found or value <= 0 or (unit == "steps" and not value.is_integer()):
        raise ValueError(f"save_interval must be minutes (e.g. 10min) or a whole number of steps "
                         f"(e.g. 500steps), got {text!r}")
    return unit, value


class RecoverySchedule:
    """When the next recovery save of ``last.pt`` inside an epoch is due.

    ``interval`` is ``"10min"`` (wall-clock minutes since the last save) or ``"500steps"``
    (optimizer steps since the last save). Asking costs a clock read or a subtraction: no I/O.
    """

    def __init__(self, interval: str, step: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.unit, self.value = parse_save_interval(interval)
        self.clock = clock
        self.saved(step)

    def due(self, step: int) -> bool:
        if self.unit == "steps":
            return step - self.last_step >= self.value
        return self.clock() - self.last_time >= 60.0 * self.value

    def saved(self, step: int) -> None:
        """``last.pt`` was just written at ``step`` (a recovery save or an epoch's end)."""
        self.last_step, self.last_time = step, self.clock()
