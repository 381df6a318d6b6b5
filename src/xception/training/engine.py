"""One training epoch: plain functions over a :class:`TrainState` (evaluation is :mod:`xception.inference.evaluate`).

Nothing here parses arguments or writes files; :mod:`.trainer` wires runs together.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import warn_unreadable
from ..runtime import all_reduce_sum, any_rank, any_rank_each, autocast, to_device
from ..runtime import progress as progress_bar

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
    ignore_index: int = -100  # targets left out of loss and accuracy (255 in segmentation masks)
    epoch: int = 0  # the epoch being (or next to be) trained, 0-based
    step: int = 0  # optimizer steps so far
    epoch_step: int = 0  # optimizer steps done in ``epoch``
    epoch_samples: int = 0  # this rank's sampler items consumed by those steps
    epoch_stats: dict[str, float] = field(default_factory=lambda: _zero_stats())


def _zero_stats() -> dict[str, float]:
    # count: targets scored (images, or labelled pixels of masks); images: images trained on
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "images": 0.0, "skipped": 0.0, "seconds": 0.0}


@dataclass
class EpochResult:
    train_loss: float
    train_top1: float
    images: int
    images_per_s: float
    skipped: int
    interrupted: bool


@dataclass
class _Pending:
    """What the micro-batches since the last optimizer step add up to (committed at the step)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    images: float = 0.0
    skipped: float = 0.0
    samples: int = 0  # sampler items consumed, readable or not
    non_finite: bool = False


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
    state.model.train()
    total = len(loader)  # type: ignore[arg-type]
    pending, micro, interrupted = _Pending(), 0, False
    t0 = time.perf_counter()
    bar = progress_bar(loader, total, f"epoch {state.epoch + 1}", progress)
    for i, batch in enumerate(bar):
        if hooks.on_batch is not None:
            hooks.on_batch(state.epoch, batch.indices)
        last = i == total - 1
        micro += 1
        sync_now = micro == state.accum_steps or last
        _forward_backward(state, batch, pending, sync=sync_now)
        if not sync_now:
            continue
        micro = 0
        _optimizer_step(state, pending)
        _commit(state, pending)
        pending = _Pending()
        if progress:
            _show_progress(bar, state.epoch_stats, state.epoch_stats["seconds"] + time.perf_counter() - t0)
        if hooks.after_step is not None:
            hooks.after_step(state.step)
        stop, save_now = any_rank_each([should_stop(), save_due(state.step)], state.device)
        if last:
            continue
        if stop:
            interrupted = True
            break
        if save_now and save is not None:
            state.epoch_stats["seconds"] += time.perf_counter() - t0  # the saved statistics are complete;
            save()  # the time spent saving is not training time
            t0 = time.perf_counter()
    state.epoch_stats["seconds"] += time.perf_counter() - t0
    if progress:
        bar.close()  # type: ignore[union-attr]
    return _epoch_result(state, interrupted)


def _forward_backward(state: TrainState, batch, pending: _Pending, *, sync: bool) -> None:
    """Forward and backward one micro-batch, accumulating gradients (DDP syncs them only when
    ``sync``: at the optimizer step), and add its loss and accuracy to ``pending``."""
    model, dev = state.model, state.device
    pending.skipped += warn_unreadable(batch)
    pending.samples += len(batch.indices) + len(batch.unreadable)
    no_sync = getattr(model, "no_sync", None)
    if len(batch.targets) == 0:
        if no_sync is not None:
            raise RuntimeError("every image of a batch was unreadable; under DDP that would stall the other ranks")
        return
    images = to_device(batch.images, dev, state.channels_last)
    targets = batch.targets.to(dev, non_blocking=True)
    scored = targets != state.ignore_index  # (B,) or (B, H, W)
    count = int(scored.sum().item())
    with no_sync() if (no_sync is not None and not sync) else nullcontext():
        with autocast(dev, state.amp_dtype):
            logits = model(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=state.label_smoothing,
                                   ignore_index=state.ignore_index)
            if count == 0:  # every pixel ignored: the mean is 0 / 0; a zero loss keeps the gradients finite
                loss = logits.sum() * 0.0
        scaled = loss / state.accum_steps
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    loss_value = loss.item()
    pending.non_finite |= not math.isfinite(loss_value)
    pending.loss_sum += loss_value * count
    pending.correct += ((logits.argmax(1) == targets) & scored).sum().item()
    pending.count += count
    pending.images += len(targets)


def _optimizer_step(state: TrainState, pending: _Pending) -> None:
    """Clip, step (through the fp16 scaler if any), schedule and average: unless the loss went
    non-finite on any rank, which raises with the weights as they were."""
    opt = state.optimizer
    if any_rank(pending.non_finite, state.device):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {state.epoch + 1}, step {state.step + 1}: "
            "stopping (lower the learning rate or try --amp off); the last checkpoint is unchanged")
    if pending.images == 0 and getattr(state.model, "no_sync", None) is None:
        return  # nothing readable in these batches: no step (under DDP every rank steps together)
    if state.scaler is not None and state.max_grad_norm:
        state.scaler.unscale_(opt)
    if state.max_grad_norm:
        nn.utils.clip_grad_norm_(state.raw_model.parameters(), state.max_grad_norm)
    if state.scaler is not None:
        state.scaler.step(opt)
        state.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    if state.ema is not None:
        state.ema.update(state.raw_model, state.step)


def _commit(state: TrainState, pending: _Pending) -> None:
    """The step is done: its samples and statistics now belong to the epoch (and to a checkpoint)."""
    state.epoch_step += 1
    state.epoch_samples += pending.samples
    for key in ("loss_sum", "correct", "count", "images", "skipped"):
        state.epoch_stats[key] += getattr(pending, key)


def _show_progress(bar, stats: dict[str, float], elapsed: float) -> None:
    if stats["count"]:
        bar.set_postfix(loss=f"{stats['loss_sum'] / stats['count']:.4f}", acc=f"{stats['correct'] / stats['count']:.3f}",
                        img_s=f"{stats.get('images', stats['count']) / max(elapsed, 1e-9):.1f}")


def _epoch_result(state: TrainState, interrupted: bool) -> EpochResult:
    """The epoch's loss, accuracy and speed, summed over ranks."""
    stats = state.epoch_stats
    totals = all_reduce_sum(torch.tensor([stats["loss_sum"], stats["correct"], stats["count"], stats["skipped"],
                                          stats.get("images", stats["count"])],
                                         dtype=torch.float64, device=state.device)).tolist()
    count = max(totals[2], 1.0)
    return EpochResult(train_loss=totals[0] / count, train_top1=totals[1] / count, images=int(totals[4]),
                       images_per_s=totals[4] / max(stats["seconds"], 1e-9), skipped=int(totals[3]),
                       interrupted=interrupted)
