"""A training run: recipe, model, optimizer, schedule, EMA, AMP, DDP, checkpoints and signals.

``fit(TrainConfig(data=..., out=...))`` is what ``xception train`` calls. It runs the same in one
process and under ``torchrun`` (see :mod:`xception.distributed`). The run directory gets:

    last.pt, best.pt     checkpoints (format in :mod:`xception.checkpoint`); best = highest val top-1
    metrics.jsonl        one JSON object per epoch
    curves.png           loss and accuracy curves
    tensorboard/         TensorBoard events (when tensorboard is installed)

SIGINT/SIGTERM finish the current optimizer step, save ``last.pt`` at that step and raise
:class:`TrainingInterrupted`; ``resume`` continues bit for bit (on CPU with the same settings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as D
from .checkpoint import (FORMAT, atomic_write, capture_rng, cpu_state_dict, load_checkpoint, load_state_checked,
                         restore_rng, save_checkpoint, seed_everything)
from .data import EpochSampler, IndexedDataset, ShardSampler, build_datasets, collate_skip
from .engine import ModelEma, StepHooks, TrainState, evaluate, train_one_epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule and regularisation defaults; any ``TrainConfig`` field overrides them."""

    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    momentum: float = 0.9
    schedule: str = "cosine"  # "step": lr * decay_rate every decay_epochs; "cosine": to 0
    decay_rate: float = 0.94
    decay_epochs: float = 2.0
    warmup_epochs: float = 0.0
    drop_rate: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA
    label_smoothing: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 299
    train_scale: float = 0.08  # smallest area fraction of the random-resized crop
    hflip: bool = True


RECIPES: dict[str, Recipe] = {
    # The paper's ImageNet recipe (Chollet 2017): SGD momentum 0.9, lr 0.045 x0.94 every 2 epochs,
    # weight decay 1e-5, dropout 0.5, Polyak (EMA) weights for evaluation.
    "paper": Recipe(optimizer="sgd", lr=0.045, weight_decay=1e-5, schedule="step", drop_rate=0.5,
                    ema_decay=0.9999, epochs=100, batch_size=32),
    # Fine-tuning (pretrained or not) on a small data set: AdamW with decoupled weight decay, a short
    # linear warm-up then cosine decay to zero, light label smoothing and dropout, EMA weights.
    "finetune": Recipe(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=1.0,
                       drop_rate=0.2, ema_decay=0.998, label_smoothing=0.1, epochs=10, batch_size=32,
                       image_size=299, train_scale=0.25),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``None`` means "the recipe's value"."""

    data: str
    out: str
    model: str = "xception"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    recipe: str = "finetune"
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    drop_rate: float | None = None
    ema_decay: float | None = None
    label_smoothing: float | None = None
    warmup_epochs: float | None = None
    train_scale: float | None = None
    hflip: bool | None = None
    crop_pct: float = 0.875
    val_split: float | None = None
    accum_steps: int = 1
    max_grad_norm: float | None = None
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 4
    resume: str | None = None
    progress: bool | None = None  # None: when stderr is a terminal

    def resolved(self) -> "TrainConfig":
        """Fill the ``None`` fields from the recipe and check every value."""
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        r = RECIPES[self.recipe]
        fill = {f.name: getattr(r, f.name) for f in dataclasses.fields(Recipe)
                if hasattr(self, f.name) and getattr(self, f.name) is None}
        cfg = dataclasses.replace(self, **fill)
        for name in ("epochs", "batch_size", "image_size", "accum_steps"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not cfg.lr > 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay!r}")
        if not 0.0 < cfg.train_scale <= 1.0:
            raise ValueError(f"train_scale must be in (0, 1], got {cfg.train_scale!r}")
        if cfg.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
        if cfg.workers < 0:
            raise ValueError(f"workers must be >= 0, got {cfg.workers!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingInterrupted(Exception):
    """A stop signal ended the run after saving ``last.pt`` at the last completed step."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint at the last completed step: "
                         f"{checkpoint} (continue with --resume)")
        self.signum = signum


class _StopFlag:
    """Records the first SIGINT/SIGTERM; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- building blocks ----------------------------------------------------------------------------


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 (fp16 on GPUs without bf16) on CUDA, off on CPU (where bf16 training is slower)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


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


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from .registry import create_model

    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, **cfg.model_kwargs}
    try:
        return create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad model option for {cfg.model!r}: {e}") from None
    except ImportError as e:
        raise ValueError(f"--pretrained needs the weights module: {e}") from None


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
    keep = {"out": cfg.out, "device": cfg.device, "workers": cfg.workers, "resume": cfg.resume,
            "progress": cfg.progress}
    if cfg.epochs is not None:
        keep["epochs"] = cfg.epochs
    return TrainConfig(**{**saved, **keep})


def _env_hooks() -> StepHooks:
    """Test hooks from the environment: sample logging, a self-sent SIGTERM, a NaN loss."""
    hooks = StepHooks()
    samples_dir = os.environ.get("XCEPTION_DEBUG_SAMPLES")
    if samples_dir:
        rank = int(os.environ.get("RANK", "0"))
        path = Path(samples_dir) / f"rank{rank}.jsonl"

        def on_batch(epoch: int, indices: torch.Tensor) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "indices": indices.tolist()}) + "\n")

        hooks.on_batch = on_batch
    at = os.environ.get("XCEPTION_DEBUG_SIGNAL_AT_STEP")
    if at:
        def after_step(step: int) -> None:
            if step == int(at):
                os.kill(os.getpid(), signal.SIGTERM)

        hooks.after_step = after_step
    nan_at = os.environ.get("XCEPTION_DEBUG_NAN_AT_STEP")
    if nan_at:
        hooks.poison_step = int(nan_at)
    return hooks


# --- the run --------------------------------------------------------------------------------------


def fit(cfg: TrainConfig, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch and checkpoint; return a summary (rank 0's view)."""
    env = D.setup(cfg.device)
    try:
        return _fit(cfg, env, hooks if hooks is not None else _env_hooks())
    finally:
        D.cleanup()


def _fit(cfg: TrainConfig, env: D.DistEnv, hooks: StepHooks) -> dict[str, Any]:
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume is not None:
        resume_path = Path(cfg.resume) if cfg.resume else out / "last.pt"
        ckpt = load_checkpoint(resume_path)
        cfg = _resume_config(cfg, ckpt, resume_path)
    cfg = cfg.resolved()
    error = D.broadcast_error(_check_out_dir(out) if env.is_main else None)
    if error:
        raise OSError(error)

    splits = build_datasets(cfg.data, image_size=cfg.image_size, crop_pct=cfg.crop_pct,
                            train_scale=(cfg.train_scale, 1.0), hflip=cfg.hflip, val_split=cfg.val_split)
    classes = list(splits.classes)
    if ckpt is not None and ckpt.get("class_names") not in (None, classes):
        raise ValueError(f"{cfg.data} has classes {classes[:5]}..., the checkpoint was trained on "
                         f"{ckpt['class_names'][:5]}...")
    seed_everything(cfg.seed + env.rank)
    model = _build_model(cfg, len(classes))
    if ckpt is not None:
        load_state_checked(model, ckpt["model"], cfg.resume or "checkpoint")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=memory_format)

    train_sampler = EpochSampler(splits.train, num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
    per_rank = len(train_sampler.inner)
    train_loader = DataLoader(
        IndexedDataset(splits.train), batch_size=cfg.batch_size, sampler=train_sampler,
        num_workers=cfg.workers, collate_fn=collate_skip, pin_memory=env.device.type == "cuda",
        drop_last=per_rank % cfg.batch_size == 1,  # a lone last sample would break batch norm
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(
        IndexedDataset(splits.val), batch_size=cfg.batch_size * 2,
        sampler=ShardSampler(len(splits.val), num_replicas=env.world_size, rank=env.rank),
        num_workers=cfg.workers, collate_fn=collate_skip, pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0)
    full_batches = per_rank // cfg.batch_size + (per_rank % cfg.batch_size > 1)
    steps_per_epoch = math.ceil(full_batches / cfg.accum_steps)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    dtype = amp_dtype(cfg.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = TrainState(model=model, raw_model=model, optimizer=optimizer, scheduler=scheduler,
                       device=env.device, scaler=scaler, ema=ema, amp_dtype=dtype,
                       channels_last=cfg.channels_last, accum_steps=cfg.accum_steps,
                       label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm)
    history: list[dict[str, Any]] = []
    best_top1 = -1.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            load_state_checked(ema.module, ckpt["ema"], cfg.resume or "checkpoint")
        state.epoch, state.step = ckpt["epoch"], ckpt["step"]
        state.epoch_step, state.epoch_samples = ckpt["epoch_step"], ckpt["epoch_samples"]
        state.epoch_stats = dict(ckpt["epoch_stats"])
        history = list(ckpt.get("history") or [])
        best_top1 = float(ckpt.get("best_top1", -1.0))
        rng = ckpt["rng"]
        restore_rng(rng[env.rank] if env.rank < len(rng) else rng[0])
        log.info("resuming from %s at epoch %d, step %d", cfg.resume, state.epoch + 1, state.step)

    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        state.raw_model = model
    if env.distributed:
        state.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.compile:
        state.model = torch.compile(state.model)

    progress = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and env.is_main
    writer = _tensorboard(out / "tensorboard", state.epoch) if env.is_main else None
    n_params = sum(p.numel() for p in state.raw_model.parameters())
    log.info("training %s (%.1fM parameters) on %s: %d train / %d val images, %d classes, %d epochs, "
             "batch %d x %d rank(s), %s, amp %s", cfg.model, n_params / 1e6, cfg.data, len(splits.train),
             len(splits.val), len(classes), cfg.epochs, cfg.batch_size, env.world_size, env.device,
             {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off"))

    def checkpoint_dict() -> dict[str, Any]:
        rng = D.gather_objects(capture_rng())
        return {
            "format": FORMAT, "model_name": cfg.model,
            "config": dataclasses.asdict(state.raw_model.config),
            "model": cpu_state_dict(state.raw_model),
            "ema": cpu_state_dict(ema.module) if ema is not None else None,
            "class_names": classes,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch, "step": state.step, "epoch_step": state.epoch_step,
            "epoch_samples": state.epoch_samples, "epoch_stats": dict(state.epoch_stats),
            "rng": rng, "train_config": cfg.to_dict(), "history": history, "best_top1": best_top1,
        }

    eval_model = ema.module if ema is not None else state.raw_model
    with _StopFlag() as stop:
        while state.epoch < cfg.epochs:
            train_sampler.set_epoch(state.epoch, start=state.epoch_samples)
            result = train_one_epoch(state, train_loader, should_stop=lambda: stop.signum is not None,
                                     hooks=hooks, progress=progress)
            if result.interrupted:
                ckpt_obj = checkpoint_dict()
                if env.is_main:
                    save_checkpoint(ckpt_obj, out / "last.pt")
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, out / "last.pt")
            val = evaluate(eval_model, val_loader, num_classes=len(classes), device=env.device,
                           amp_dtype=dtype, channels_last=cfg.channels_last, progress=progress)
            metrics = {
                "epoch": state.epoch + 1, "step": state.step, "train_loss": result.train_loss,
                "train_top1": result.train_top1, "val_loss": val["loss"], "val_top1": val["top1"],
                "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": result.images_per_s, "epoch_time_s": state.epoch_stats["seconds"],
                "skipped_images": result.skipped + val["skipped"], "ema": ema is not None,
            }
            history.append(metrics)
            is_best = val["top1"] > best_top1
            best_top1 = max(best_top1, val["top1"])
            state.epoch += 1
            state.epoch_step, state.epoch_samples = 0, 0
            state.epoch_stats = {k: 0.0 for k in state.epoch_stats}
            ckpt_obj = checkpoint_dict()
            if env.is_main:
                save_checkpoint(ckpt_obj, out / "last.pt")
                if is_best:
                    _link_or_copy(out / "last.pt", out / "best.pt")
                _write_metrics(out, history, writer)
                log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.2f%%  val_top5 %.2f%%  "
                         "lr %.3g  %.1f img/s%s", metrics["epoch"], cfg.epochs, metrics["train_loss"],
                         metrics["val_loss"], 100 * metrics["val_top1"], 100 * metrics["val_top5"],
                         metrics["lr"], metrics["images_per_s"],
                         f"  ({metrics['skipped_images']} unreadable images skipped)"
                         if metrics["skipped_images"] else "")
            if stop.signum is not None:
                raise TrainingInterrupted(stop.signum, out / "last.pt")
    if writer is not None:
        writer.close()
    return {"run_dir": str(out), "epochs": state.epoch, "steps": state.step, "best_val_top1": best_top1,
            "last": history[-1] if history else None, "last_pt": str(out / "last.pt"),
            "best_pt": str(out / "best.pt"), "class_names": classes}


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link where the file system allows)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _tensorboard(log_dir: Path, start_epoch: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=start_epoch + 1)


def _write_metrics(out: Path, history: list[dict[str, Any]], writer) -> None:
    """``metrics.jsonl`` and ``curves.png`` rewritten from the whole history (atomically)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write(out / "metrics.jsonl", lambda f: f.write(text), mode="w")
    plot_curves(history, out / "curves.png")
    if writer is not None:
        m = history[-1]
        for key in ("train_loss", "val_loss", "train_top1", "val_top1", "val_top5", "lr", "images_per_s"):
            writer.add_scalar(key, m[key], m["epoch"])
        writer.flush()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
