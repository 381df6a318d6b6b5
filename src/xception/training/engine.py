"""One training epoch and one evaluation pass: plain functions over a :class:`TrainState`.

Nothing here parses arguments or writes files; :mod:`.trainer` wires runs together.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, any_rank, any_rank_each

log = logging.getLogger(__name__)


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite."""


class ModelEma:
    """Exponential moving average of a model's weights (the paper's Polyak averaging).

    ``decay`` ramps up as ``min(decay, (1 + step) / (10 + step))`` so that short runs still average
    over their recent steps. Floating-point buffers (batch-norm statistics) are averaged too.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_sd, sd = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema_sd.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema_sd[k] for k in floats], [sd[k].detach() for k in floats], 1.0 - d)
        for k, v in ema_sd.items():
            if not v.is_floating_point():
                v.copy_(sd[k])


@dataclass
class StepHooks:
    """Observation points for tests and debugging (all optional)."""

    on_batch: Callable[[int, torch.Tensor], None] | None = None  # (epoch, sample indices)
    after_step: Callable[[int], None] | None = None  # global optimizer step just completed


@dataclass
class TrainState:
    """Everything one training epoch reads and advances.

    ``model`` is what runs forward (maybe DDP- and/or compile-wrapped); ``raw_model`` is the plain
    module that is saved, averaged by ``ema`` and evaluated.
    """

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    accum_steps: int = 1
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    epoch: int = 0  # the epoch being (or next to be) trained, 0-based
    step: int = 0  # optimizer steps so far
    epoch_step: int = 0  # optimizer steps done in ``epoch``
    epoch_samples: int = 0  # this rank's sampler items consumed by those steps
    epoch_stats: dict[str, float] = field(default_factory=lambda: _zero_stats())


def _zero_stats() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0, "seconds": 0.0}


@dataclass
class EpochResult:
    train_loss: float
    train_top1: float
    images: int
    images_per_s: float
    skipped: int
    interrupted: bool


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 (fp16 on GPUs without bf16) on CUDA, off on CPU (where bf16 training is slower)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def train_one_epoch(state: TrainState, loader: Iterable, *, should_stop: Callable[[], bool] = lambda: False,
                    save_due: Callable[[int], bool] = lambda step: False, save: Callable[[], None] | None = None,
                    hooks: StepHooks | None = None, progress: bool = False) -> EpochResult:
    """Train ``state.model`` over ``loader`` (already positioned at ``state.epoch_samples``).

    Takes an optimizer step every ``accum_steps`` batches (and at the end of the epoch). After each
    step, stops early when ``should_stop()`` is true on any rank: ``interrupted`` is then set and
    ``state`` describes the last completed step exactly. Otherwise, when ``save_due(step)`` is true
    on any rank, calls ``save()`` with ``state`` at that step (on every rank; not after the epoch's
    last step, which the caller saves anyway). Both answers travel in one all-reduce per step.
    Raises :class:`NonFiniteLossError` before stepping on a NaN/inf loss, so the weights stay
    those of the last good step.
    """
    hooks = hooks or StepHooks()
    model, opt, dev = state.model, state.optimizer, state.device
    model.train()
    stats = state.epoch_stats
    total = len(loader)  # type: ignore[arg-type]
    pending = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0, "samples": 0, "bad": False}
    micro = 0
    t0 = time.perf_counter()
    bar = _progress(loader, total, f"epoch {state.epoch + 1}", progress)
    interrupted = False
    for i, (images, targets, indices, skipped) in enumerate(bar):
        if hooks.on_batch is not None:
            hooks.on_batch(state.epoch, indices)
        pending["skipped"] += skipped
        pending["samples"] += len(indices) + skipped
        last = i == total - 1
        micro += 1
        sync_now = micro == state.accum_steps or last
        if len(targets) > 0:
            images = _to_device(images, dev, state.channels_last)
            targets = targets.to(dev, non_blocking=True)
            no_sync = getattr(model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and not sync_now) else nullcontext()
            with ctx:
                with autocast(dev, state.amp_dtype):
                    logits = model(images)
                    loss = F.cross_entropy(logits, targets, label_smoothing=state.label_smoothing)
                scaled = loss / state.accum_steps
                (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                pending["bad"] = True
            n = len(targets)
            pending["loss_sum"] += loss_value * n
            pending["correct"] += (logits.argmax(1) == targets).sum().item()
            pending["count"] += n
        elif getattr(model, "no_sync", None) is not None:
            raise RuntimeError("every image of a batch was unreadable; under DDP that would stall the other ranks")
        if not sync_now:
            continue
        micro = 0
        if any_rank(bool(pending["bad"]), dev):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {state.epoch + 1}, step {state.step + 1}: "
                "stopping (lower the learning rate or try --amp off); the last checkpoint is unchanged")
        if pending["count"] > 0 or getattr(model, "no_sync", None) is not None:
            if state.scaler is not None:
                if state.max_grad_norm:
                    state.scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(state.raw_model.parameters(), state.max_grad_norm)
                state.scaler.step(opt)
                state.scaler.update()
            else:
                if state.max_grad_norm:
                    nn.utils.clip_grad_norm_(state.raw_model.parameters(), state.max_grad_norm)
                opt.step()
            opt.zero_grad(set_to_none=True)
            state.scheduler.step()
            state.step += 1
            if state.ema is not None:
                state.ema.update(state.raw_model, state.step)
        state.epoch_step += 1
        state.epoch_samples += pending["samples"]
        for k in ("loss_sum", "correct", "count", "skipped"):
            stats[k] += pending[k]
        pending.update(loss_sum=0.0, correct=0.0, count=0.0, skipped=0.0, samples=0)
        if progress and stats["count"]:
            elapsed = stats["seconds"] + time.perf_counter() - t0
            bar.set_postfix(loss=f"{stats['loss_sum'] / stats['count']:.4f}",  # type: ignore[union-attr]
                            acc=f"{stats['correct'] / stats['count']:.3f}",
                            img_s=f"{stats['count'] / max(elapsed, 1e-9):.1f}")
        if hooks.after_step is not None:
            hooks.after_step(state.step)
        stop, save_now = any_rank_each([should_stop(), save_due(state.step)], dev)
        if last:
            continue
        if stop:
            interrupted = True
            break
        if save_now and save is not None:
            stats["seconds"] += time.perf_counter() - t0  # the saved statistics are complete; the
            save()  # time spent saving is not training time
            t0 = time.perf_counter()
    stats["seconds"] += time.perf_counter() - t0
    if progress:
        bar.close()  # type: ignore[union-attr]
    totals = all_reduce_sum(torch.tensor([stats["loss_sum"], stats["correct"], stats["count"], stats["skipped"]],
                                         dtype=torch.float64, device=dev)).tolist()
    count = max(totals[2], 1.0)
    return EpochResult(train_loss=totals[0] / count, train_top1=totals[1] / count, images=int(totals[2]),
                       images_per_s=totals[2] / max(stats["seconds"], 1e-9), skipped=int(totals[3]),
                       interrupted=interrupted)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, num_classes: int, device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix, summed over all ranks.

    ``model`` must be a plain module (not DDP-wrapped): ranks may see different numbers of batches.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top5 correct, skipped
    k = min(5, num_classes)
    for images, targets, _, skipped in _progress(loader, len(loader), "eval", progress):  # type: ignore[arg-type]
        sums[2] += skipped
        if len(targets) == 0:
            continue
        images = _to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        sums[1] += (topk == targets[:, None]).any(dim=1).sum()
        pred = topk[:, 0]
        confusion.index_put_((targets, pred), torch.ones_like(pred, dtype=torch.float64), accumulate=True)
    confusion = all_reduce_sum(confusion)
    sums = all_reduce_sum(sums)
    count = confusion.sum().item()
    n = max(count, 1.0)
    per_class_total = confusion.sum(1)
    per_class = (confusion.diag() / per_class_total.clamp(min=1)).tolist()
    return {
        "loss": sums[0].item() / n,
        "top1": confusion.diag().sum().item() / n,
        "top5": sums[1].item() / n,
        "count": int(count),
        "skipped": int(sums[2].item()),
        "per_class": [acc if total > 0 else None for acc, total in zip(per_class, per_class_total.tolist())],
        "confusion": confusion.long().tolist(),
    }
