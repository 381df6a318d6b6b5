"""A training run: recipe, model, optimizer, schedule, EMA, AMP, DDP, checkpoints and signals.

``fit(TrainConfig(data=..., out=...))`` is what ``xception train`` calls. It runs the same in one
process and under ``torchrun`` (see :mod:`xception.runtime`). The run directory gets:

    last.pt, best.pt     checkpoints (format in :mod:`.checkpoint`); best = highest val top-1
    metrics.jsonl        one JSON object per epoch
    curves.png           loss and accuracy curves
    tensorboard/         TensorBoard events (with the tensorboard extra installed)

SIGINT/SIGTERM finish the current optimizer step, save ``last.pt`` at that step and raise
:class:`TrainingInterrupted`; ``resume`` continues bit for bit (on CPU with the same settings).
With ``save_interval`` (``"10min"`` / ``"500steps"``) ``last.pt`` is also saved inside an epoch,
so a process killed outright loses at most one interval. ``resume="auto"`` continues from
``out/last.pt`` when there is one and starts a new run otherwise, so that one command can be
retried until it succeeds; a run already complete returns at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..extras import require
from ..fileio import atomic_path, atomic_write
from ..models.registry import build_model
from ..preprocessing import Preprocessing
from ..weights import CHECKPOINT_FORMAT, load_pretrained, load_state_dict_checked, read_weights, resolve_source
from ..weights.loading import weights_preprocessing
from ..weights.readers import checkpoint_preprocessing
from .. import runtime
from ..data.images import collate_skip
from ..data.splits import DataSplits, keyed, training_splits
from ..inference.evaluate import evaluate
from ..runtime import amp_dtype
from .checkpoint import (RecoverySchedule, capture_rng, cpu_state_dict, load_checkpoint, restore_rng, save_checkpoint,
                         seed_everything)
from .engine import ModelEma, StepHooks, TrainState, train_one_epoch
from .recipes import RECIPES, TrainConfig
from .reporting import open_tensorboard, write_metrics

log = logging.getLogger(__name__)

AUTO = "auto"  # resume: out/last.pt when it exists, else a new run


class TrainingInterrupted(Exception):
    """A stop signal ended the run after saving ``last.pt`` at the last completed step."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint at the last completed step: "
                         f"{checkpoint} (continue with --resume)")
        self.signum = signum


class StopSignals:
    """Records the first SIGINT/SIGTERM; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- building blocks ----------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on batch-norm parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    r = RECIPES[cfg.recipe]
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=r.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step ``LambdaLR``: linear warm-up, then step decay (paper) or cosine to zero."""
    r = RECIPES[cfg.recipe]
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if r.schedule == "step":
            return r.decay_rate ** math.floor(step / (r.decay_epochs * steps_per_epoch))
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _build_model(cfg: TrainConfig, num_classes: int, weights) -> nn.Module:
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, **cfg.model_kwargs}
    try:
        if weights is None:
            return build_model(cfg.model, **kwargs)
        return load_pretrained(cfg.model, weights, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad model option for {cfg.model!r}: {e}") from None


def _preprocessing(cfg: TrainConfig, weights, ckpt: dict[str, Any] | None, resume_path: Path | None) -> Preprocessing:
    """The run's preprocessing: a resumed run's own; else the pretrained weights' (or the default),
    with this run's image size and crop."""
    if ckpt is not None:
        recorded = checkpoint_preprocessing(ckpt, resume_path)
        if recorded is not None:
            return recorded
    base = weights_preprocessing(weights, cfg.model) if weights is not None else Preprocessing()
    return base.replace(image_size=cfg.image_size, crop_pct=cfg.crop_pct)


def _check_out_dir(out: Path) -> str | None:
    """None when ``out`` can hold the run's files, else a one-line reason."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / ".write-test", lambda f: f.write(b"ok"))
        (out / ".write-test").unlink()
    except OSError as e:
        return f"cannot write to output folder {out}: {e.strerror or e}"
    return None


def _resume_config(cfg: TrainConfig, ckpt: dict[str, Any], path: Path) -> TrainConfig:
    """The checkpoint's settings, with this invocation's epochs, output, device, workers, progress."""
    if ckpt["model_name"] != cfg.model:
        raise ValueError(f"{path} is a checkpoint of model {ckpt['model_name']!r}, not {cfg.model!r}")
    saved = dict(ckpt.get("train_config") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    if not saved:
        raise ValueError(f"{path} has no training settings to resume from")
    if cfg.resume == AUTO and not _same_data(saved.get("data"), cfg.data):
        raise ValueError(f"{path} is a run on {saved.get('data')}, not {cfg.data} (use another --out for a new run)")
    keep = {"out": cfg.out, "device": cfg.device, "workers": cfg.workers, "resume": cfg.resume,
            "progress": cfg.progress}
    for name in ("epochs", "save_interval"):
        if getattr(cfg, name) is not None:
            keep[name] = getattr(cfg, name)
    return TrainConfig(**{**saved, **keep})


def _same_data(a: str | None, b: str) -> bool:
    """The same data argument, or two spellings of the same local path."""
    if a == b:
        return True
    pa, pb = Path(str(a)).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def checkpoint_to_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``resume`` names ("" = ``out/last.pt``), or None for a new run (``auto``
    without ``out/last.pt``)."""
    if resume is None:
        return None
    if resume == AUTO:
        if (out / "last.pt").is_file():
            return out / "last.pt"
        log.info("--resume auto: no checkpoint at %s yet: starting a new run", out / "last.pt")
        return None
    return Path(resume) if resume else out / "last.pt"


def remove_stale_temps(out: Path) -> None:
    """Delete checkpoint temporaries that a killed save left behind (``fileio.atomic_path`` names them
    ``.NAME.XXXX.tmp``); a run directory holds one run, so none of them is being written now."""
    for name in ("last.pt", "best.pt"):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted save", tmp)


def _summary(out: Path, epochs: int, steps: int, best_top1: float, history: list[dict[str, Any]],
             classes: list[str]) -> dict[str, Any]:
    return {"run_dir": str(out), "epochs": epochs, "steps": steps, "best_val_top1": best_top1,
            "last": history[-1] if history else None, "last_pt": str(out / "last.pt"),
            "best_pt": str(out / "best.pt"), "class_names": classes}


# --- the run --------------------------------------------------------------------------------------


def fit(cfg: TrainConfig, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch and checkpoint; return a summary (rank 0's view)."""
    env = runtime.setup(cfg.device)
    try:
        return _fit(cfg, env, hooks or StepHooks())
    finally:
        runtime.cleanup()


def _fit(cfg: TrainConfig, env: runtime.DistEnv, hooks: StepHooks) -> dict[str, Any]:
    out = Path(cfg.out)
    ckpt, resume_path = None, checkpoint_to_resume(cfg.resume, out)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        cfg = _resume_config(cfg, ckpt, resume_path)
    cfg = cfg.resolved()
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        log.info("%s: the run is complete (%d of %d epochs): nothing to train", resume_path, ckpt["epoch"], cfg.epochs)
        return _summary(out, ckpt["epoch"], ckpt["step"], float(ckpt.get("best_top1", -1.0)),
                        list(ckpt.get("history") or []), list(ckpt.get("class_names") or []))
    if cfg.tensorboard:  # asked for: fail now, before any work, if the extra is missing
        require("tensorboard", "tensorboard", "TensorBoard logging")
    error = runtime.broadcast_error(_check_out_dir(out) if env.is_main else None)
    if error:
        raise OSError(error)
    if env.is_main:
        remove_stale_temps(out)

    run = _setup_run(cfg, env, out, ckpt, resume_path)
    if ckpt is not None:
        _restore(run, ckpt, resume_path)
    _wrap_model(run)
    return _train(run, hooks)


@dataclass
class _Run:
    """One training run, set up: what the epoch loop reads and what a checkpoint records."""

    cfg: TrainConfig
    env: runtime.DistEnv
    out: Path
    classes: list[str]
    preprocessing: Preprocessing
    state: TrainState
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: Any
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_top1: float = -1.0


def _setup_run(cfg: TrainConfig, env: runtime.DistEnv, out: Path, ckpt: dict[str, Any] | None,
               resume_path: Path | None) -> _Run:
    """Data, model (pretrained or resumed weights), loaders, optimizer, schedule, AMP and EMA."""
    weights = None
    if cfg.pretrained is not None and ckpt is None:  # read once: its preprocessing, then its weights
        weights = read_weights(resolve_source(cfg.pretrained))
    preprocessing = _preprocessing(cfg, weights, ckpt, resume_path)
    splits = training_splits(cfg.data, preprocessing, train_scale=(cfg.train_scale, 1.0), hflip=cfg.hflip,
                             val_split=cfg.val_split, val_data=cfg.val_data)
    classes = list(splits.classes)
    if ckpt is not None and ckpt.get("class_names") not in (None, classes):
        raise ValueError(f"{cfg.data} has classes {classes[:5]}..., the checkpoint was trained on "
                         f"{ckpt['class_names'][:5]}...")
    seed_everything(cfg.seed + env.rank)
    model = _build_model(cfg, len(classes), weights)
    if ckpt is not None:
        load_state_dict_checked(model, ckpt["model"], resume_path)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=memory_format)

    train_loader, val_loader, train_sampler = _loaders(cfg, env, splits)
    per_rank = train_sampler.epoch_length
    full_batches = per_rank // cfg.batch_size + (per_rank % cfg.batch_size > 1)
    steps_per_epoch = math.ceil(full_batches / cfg.accum_steps)
    optimizer = build_optimizer(model, cfg)
    dtype = amp_dtype(cfg.amp, env.device)
    state = TrainState(model=model, raw_model=model, optimizer=optimizer,
                       scheduler=build_scheduler(optimizer, cfg, steps_per_epoch), device=env.device,
                       scaler=torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None,
                       ema=ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, amp_dtype=dtype,
                       channels_last=cfg.channels_last, accum_steps=cfg.accum_steps,
                       label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm)
    log.info("training %s (%.1fM parameters) on %s: %d train / %d val images, %d classes, %d epochs, "
             "batch %d x %d rank(s), %s, amp %s", cfg.model, sum(p.numel() for p in model.parameters()) / 1e6,
             cfg.data, len(splits.train), len(splits.val), len(classes), cfg.epochs, cfg.batch_size,
             env.world_size, env.device, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off"))
    return _Run(cfg, env, out, classes, preprocessing, state, train_loader, val_loader, train_sampler)


def _loaders(cfg: TrainConfig, env: runtime.DistEnv, splits: DataSplits) -> tuple[DataLoader, DataLoader, Any]:
    """This rank's training loader (seeded, resumable sampler) and validation loader, and the sampler."""
    train_data, train_sampler = keyed(splits.train, train=True, num_replicas=env.world_size, rank=env.rank,
                                      seed=cfg.seed)
    val_data, val_sampler = keyed(splits.val, train=False, num_replicas=env.world_size, rank=env.rank)
    per_rank = train_sampler.epoch_length
    if getattr(train_sampler, "left_out", 0):
        log.warning("%d of %d training samples are left out of each epoch: the ranks' shards hold unequal counts "
                    "(every rank takes %d)", train_sampler.left_out, len(splits.train), per_rank)
    pin = env.device.type == "cuda"
    train_loader = DataLoader(
        train_data, batch_size=cfg.batch_size, sampler=train_sampler, num_workers=cfg.workers,
        collate_fn=collate_skip, pin_memory=pin,
        drop_last=per_rank % cfg.batch_size == 1,  # a lone last sample would break batch norm
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(val_data, batch_size=cfg.batch_size * 2, sampler=val_sampler, num_workers=cfg.workers,
                            collate_fn=collate_skip, pin_memory=pin, persistent_workers=cfg.workers > 0)
    return train_loader, val_loader, train_sampler


def _restore(run: _Run, ckpt: dict[str, Any], path: Path | None) -> None:
    """Optimizer, schedule, scaler, EMA, position in the epoch, history and random state of a checkpoint."""
    restore_progress(run.state, ckpt, run.env.rank, path)
    if run.state.ema is not None and ckpt.get("ema") is not None:
        load_state_dict_checked(run.state.ema.module, ckpt["ema"], path)
    run.history = list(ckpt.get("history") or [])
    run.best_top1 = float(ckpt.get("best_top1", -1.0))


def restore_progress(state: TrainState, ckpt: dict[str, Any], rank: int, path: Path | None) -> None:
    """What any training checkpoint holds: optimizer, schedule, scaler, position in the epoch and
    this rank's random state."""
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step = ckpt["epoch"], ckpt["step"]
    state.epoch_step, state.epoch_samples = ckpt["epoch_step"], ckpt["epoch_samples"]
    state.epoch_stats = {"images": ckpt["epoch_stats"].get("count", 0.0), **ckpt["epoch_stats"]}
    rng = ckpt["rng"]
    restore_rng(rng[rank] if rank < len(rng) else rng[0])
    log.info("resuming from %s at epoch %d, step %d", path, state.epoch + 1, state.step)


def _wrap_model(run: _Run) -> None:
    """SyncBN and DDP across ranks, ``torch.compile`` if asked: what runs forward (never what is saved)."""
    distribute(run.state, run.env, sync_bn=run.cfg.sync_bn)
    if run.cfg.compile:
        run.state.model = torch.compile(run.state.model)


def distribute(state: TrainState, env: runtime.DistEnv, *, sync_bn: bool) -> None:
    """Under torchrun: SyncBN (if asked, on accelerators) and DDP around ``state.model``."""
    if sync_bn and env.distributed:
        if env.device.type == "cpu":  # PyTorch's SyncBatchNorm runs on accelerators only
            log.info("SyncBatchNorm needs GPUs: on the CPU each rank normalises over its own batch")
        else:
            state.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(state.raw_model)
            state.model = state.raw_model
    if env.distributed:
        state.model = nn.parallel.DistributedDataParallel(
            state.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def _checkpoint(run: _Run) -> dict[str, Any]:
    """Everything a resume needs, at the state's step (every rank's random state gathered)."""
    state, cfg = run.state, run.cfg
    rng = runtime.gather_objects(capture_rng())
    return {
        "format": CHECKPOINT_FORMAT, "model_name": cfg.model,
        "config": dataclasses.asdict(state.raw_model.config),
        "model": cpu_state_dict(state.raw_model),
        "ema": cpu_state_dict(state.ema.module) if state.ema is not None else None,
        "class_names": run.classes, "preprocessing": run.preprocessing.to_dict(),
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "epoch": state.epoch, "step": state.step, "epoch_step": state.epoch_step,
        "epoch_samples": state.epoch_samples, "epoch_stats": dict(state.epoch_stats),
        "rng": rng, "train_config": cfg.to_dict(), "history": run.history, "best_top1": run.best_top1,
    }


def _train(run: _Run, hooks: StepHooks) -> dict[str, Any]:
    """The epochs: train, validate, record, checkpoint; a stop signal ends it after a save."""
    cfg, env, state, out = run.cfg, run.env, run.state, run.out
    progress = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and env.is_main
    writer = open_tensorboard(out / "tensorboard", state.epoch, cfg.tensorboard) if env.is_main else None
    schedule = RecoverySchedule(cfg.save_interval, state.step) if cfg.save_interval else None

    def save_last() -> None:
        ckpt = _checkpoint(run)
        if env.is_main:
            save_checkpoint(ckpt, out / "last.pt")
        if schedule is not None:
            schedule.saved(state.step)

    def recovery_save() -> None:
        save_last()
        log.info("saved %s at epoch %d, step %d", out / "last.pt", state.epoch + 1, state.step)

    eval_model = state.ema.module if state.ema is not None else state.raw_model
    with StopSignals() as stop:
        while state.epoch < cfg.epochs:
            run.train_sampler.set_epoch(state.epoch, start=state.epoch_samples)
            result = train_one_epoch(state, run.train_loader, should_stop=lambda: stop.signum is not None,
                                     save_due=schedule.due if schedule is not None else lambda step: False,
                                     save=recovery_save, hooks=hooks, progress=progress)
            if result.interrupted:
                save_last()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, out / "last.pt")
            val = evaluate(eval_model, run.val_loader, num_classes=len(run.classes), device=env.device,
                           amp_dtype=state.amp_dtype, channels_last=cfg.channels_last, progress=progress)
            metrics = _epoch_metrics(state, result, val)
            run.history.append(metrics)
            is_best = val["top1"] > run.best_top1
            run.best_top1 = max(run.best_top1, val["top1"])
            state.epoch += 1
            state.epoch_step, state.epoch_samples = 0, 0
            state.epoch_stats = {k: 0.0 for k in state.epoch_stats}
            save_last()
            if env.is_main:
                if is_best:
                    link_or_copy(out / "last.pt", out / "best.pt")
                write_metrics(out, run.history, writer)
                _log_epoch(metrics, cfg.epochs)
            if stop.signum is not None:
                raise TrainingInterrupted(stop.signum, out / "last.pt")
    if writer is not None:
        writer.close()
    return _summary(out, state.epoch, state.step, run.best_top1, run.history, run.classes)


def _epoch_metrics(state: TrainState, result, val: dict[str, Any]) -> dict[str, Any]:
    """The line ``metrics.jsonl`` gets for the epoch just trained and validated."""
    return {
        "epoch": state.epoch + 1, "step": state.step, "train_loss": result.train_loss,
        "train_top1": result.train_top1, "val_loss": val["loss"], "val_top1": val["top1"],
        "val_top5": val["top5"], "lr": state.optimizer.param_groups[0]["lr"],
        "images_per_s": result.images_per_s, "epoch_time_s": state.epoch_stats["seconds"],
        "skipped_images": result.skipped + val["skipped"], "ema": state.ema is not None,
    }


def _log_epoch(m: dict[str, Any], epochs: int) -> None:
    log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.2f%%  val_top5 %.2f%%  lr %.3g  %.1f img/s%s",
             m["epoch"], epochs, m["train_loss"], m["val_loss"], 100 * m["val_top1"], 100 * m["val_top5"], m["lr"],
             m["images_per_s"], f"  ({m['skipped_images']} unreadable images skipped)" if m["skipped_images"] else "")


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link where the file system allows)."""
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
