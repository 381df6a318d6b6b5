"""Training DeepLabv3+: the paper's recipe, on the classification trainer's engine.

``fit(SegmentTrainConfig(data=..., out=...))`` is what ``xception segment train`` calls. The
recipe by default: SGD with momentum 0.9, learning rate 0.007 on a poly schedule (power 0.9) over
every step, weight decay 4e-5, crops of 513 after a random scale of 0.5-2.0 and a flip, batch 16,
output stride 16, batch norm trained (SyncBN across GPU ranks). Under ``torchrun`` each rank reads its
share of every epoch::

    torchrun --nproc-per-node 2 -m xception segment train --data VOC --out run

The run directory gets ``last.pt`` / ``best.pt`` (best = highest validation mIoU) and
``metrics.jsonl``. SIGINT/SIGTERM save ``last.pt`` at the last completed step and stop;
``--resume`` continues bit for bit (CPU, same settings), ``--resume auto`` also starts a new run
when there is nothing to resume, ``--save-interval`` saves inside epochs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import runtime
from ..data.images import collate_skip
from ..data.sampling import EpochSampler, IndexedDataset, ShardSampler
from ..data.segmentation import (
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)
from ..fileio import atomic_write, torch_load_safe
from ..training.checkpoint import (
    RecoverySchedule,
    capture_rng,
    cpu_state_dict,
    save_checkpoint,
    seed_everything,
)
from ..training.engine import StepHooks, TrainState, train_one_epoch
from ..training.trainer import (
    StopSignals,
    TrainingInterrupted,
    checkpoint_to_resume,
    distribute,
    link_or_copy,
    remove_stale_temps,
    restore_progress,
)
from .evaluate import evaluate_segmentation
from .model import DeepLabConfig, DeepLabV3Plus
from .weights import (
    DEEPLAB_PREPROCESSING,
    SEGMENTATION_CHECKPOINT_FORMAT,
    head_depthwise_bn,
    load_encoder,
    load_state_checked,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentTrainConfig:
    """A segmentation training run. The defaults are the DeepLabv3+ paper's recipe.

    Args:
        data: a VOC tree or a plain ``{train,val}/{images,masks}`` tree.
        out: the run directory.
        backbone: encoder (``list_models()``); ``encoder_weights``: its ImageNet weights file.
        num_classes: default: the data's class names (VOC: 21; plain: ``classes.txt``).
        crop_size, scale_range: random scale of each image, then a crop (padded with the ignore label).
        grad_checkpointing: recompute encoder blocks in backward (less memory at large crops).
        max_steps: stop each run after this many optimizer steps in total (None: every epoch).
    """

    data: str
    out: str
    backbone: str = "xception65"
    encoder_weights: str | None = None
    encoder_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None
    epochs: int = 30
    batch_size: int = 16
    lr: float = 0.007
    poly_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 4e-5
    crop_size: int = 513
    scale_range: tuple[float, float] = (0.5, 2.0)
    output_stride: int = 16
    grad_checkpointing: bool = False
    sync_bn: bool = True
    amp: str = "off"
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    resume: str | None = None
    save_interval: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < min <= max, got {self.scale_range!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Run:
    cfg: SegmentTrainConfig
    env: runtime.DistEnv
    out: Path
    model: DeepLabV3Plus
    class_names: list[str] | None
    state: TrainState
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_miou: float = -1.0


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float):
    """``lr * (1 - step / total) ** power`` at every step (the paper's "poly" policy)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(total_steps, 1)) ** power)


def fit(cfg: SegmentTrainConfig, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train, evaluate mIoU each epoch and checkpoint; return a summary (rank 0's view)."""
    env = runtime.setup(cfg.device)
    try:
        return _fit(cfg, env, hooks or StepHooks())
    finally:
        runtime.cleanup()


def _fit(cfg: SegmentTrainConfig, env: runtime.DistEnv, hooks: StepHooks) -> dict[str, Any]:
    out = Path(cfg.out)
    ckpt, resume_path = None, checkpoint_to_resume(cfg.resume, out)
    if resume_path is not None:
        ckpt = _load_checkpoint(resume_path)
        cfg = _resume_config(cfg, ckpt, resume_path)
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        log.info("%s: the run is complete (%d of %d epochs)", resume_path, ckpt["epoch"], cfg.epochs)
        return _summary(out, ckpt["epoch"], ckpt["step"], ckpt.get("best_miou", -1.0), ckpt.get("history") or [])
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        remove_stale_temps(out)
    run = _setup_run(cfg, env, out, ckpt, resume_path)
    if ckpt is not None:
        _restore(run, ckpt, resume_path)
    _wrap_model(run)
    return _train(run, hooks)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch_load_safe(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != SEGMENTATION_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of `xception segment train`")
    return ckpt


def _resume_config(cfg: SegmentTrainConfig, ckpt: dict[str, Any], path: Path) -> SegmentTrainConfig:
    """The checkpoint's settings, with this invocation's epochs, output, device, workers, progress."""
    saved = dict(ckpt.get("train_config") or {})
    known = {f.name for f in dataclasses.fields(SegmentTrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    saved["scale_range"] = tuple(saved.get("scale_range", cfg.scale_range))
    keep = {"out": cfg.out, "device": cfg.device, "workers": cfg.workers, "resume": cfg.resume,
            "progress": cfg.progress, "epochs": cfg.epochs}
    if cfg.save_interval is not None:
        keep["save_interval"] = cfg.save_interval
    return SegmentTrainConfig(**{**saved, **keep})


def _datasets(cfg: SegmentTrainConfig, num_classes: int | None):
    mean, std = DEEPLAB_PREPROCESSING.mean, DEEPLAB_PREPROCESSING.std
    train = SegmentationDataset(cfg.data, "train", num_classes=num_classes,
                                transform=SegmentationTrainTransform(cfg.crop_size, cfg.scale_range, mean=mean, std=std))
    val = SegmentationDataset(cfg.data, "val", num_classes=num_classes,
                              transform=SegmentationEvalTransform(mean=mean, std=std))
    return train, val


def _setup_run(cfg: SegmentTrainConfig, env: runtime.DistEnv, out: Path, ckpt: dict[str, Any] | None,
               resume_path: Path | None) -> _Run:
    probe = SegmentationDataset(cfg.data, "train", num_classes=cfg.num_classes)
    class_names = probe.class_names
    num_classes = cfg.num_classes or (len(class_names) if class_names else None)
    if num_classes is None:
        raise ValueError(f"{cfg.data}: no class names (classes.txt) to count the classes: give --num-classes")
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    train_set, val_set = _datasets(cfg, num_classes)
    seed_everything(cfg.seed + env.rank)
    head = {} if ckpt is None else {"head_depthwise_bn": head_depthwise_bn(ckpt["config"], ckpt["model"])}
    model = DeepLabV3Plus(DeepLabConfig(backbone=cfg.backbone, num_classes=num_classes, output_stride=cfg.output_stride,
                                        encoder_options=dict(cfg.encoder_options), **head))
    if ckpt is not None:
        load_state_checked(model, ckpt["model"], resume_path)
    elif cfg.encoder_weights:
        load_encoder(model, cfg.encoder_weights)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model = model.to(env.device)

    train_sampler = EpochSampler(train_set, num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
    per_rank = train_sampler.epoch_length
    train_loader = DataLoader(IndexedDataset(train_set), batch_size=cfg.batch_size, sampler=train_sampler,
                              num_workers=cfg.workers, collate_fn=collate_skip,
                              drop_last=per_rank % cfg.batch_size == 1,  # a lone last sample would break batch norm
                              # its own generator: starting an epoch then draws nothing from the global
                              # RNG (dropout's), so a resumed epoch continues the same random stream
                              generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(IndexedDataset(val_set), batch_size=1, num_workers=cfg.workers,
                            sampler=ShardSampler(len(val_set), num_replicas=env.world_size, rank=env.rank),
                            collate_fn=collate_skip)
    steps_per_epoch = per_rank // cfg.batch_size + (per_rank % cfg.batch_size > 1)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)
    dtype = runtime.amp_dtype(cfg.amp, env.device)
    state = TrainState(model=model, raw_model=model, optimizer=optimizer,
                       scheduler=poly_schedule(optimizer, cfg.epochs * steps_per_epoch, cfg.poly_power),
                       device=env.device, amp_dtype=dtype, ignore_index=255,
                       scaler=torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None)
    log.info("training DeepLabv3+ %s (%.1fM parameters) on %s: %d train / %d val images, %d classes, %d epochs, "
             "batch %d x %d rank(s), crop %d, output stride %d, %s", cfg.backbone,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.data, len(train_set), len(val_set), num_classes,
             cfg.epochs, cfg.batch_size, env.world_size, cfg.crop_size, cfg.output_stride, env.device)
    return _Run(cfg, env, out, model, class_names, state, train_loader, val_loader, train_sampler)


def _restore(run: _Run, ckpt: dict[str, Any], path: Path | None) -> None:
    restore_progress(run.state, ckpt, run.env.rank, path)
    run.history = list(ckpt.get("history") or [])
    run.best_miou = float(ckpt.get("best_miou", -1.0))


def _wrap_model(run: _Run) -> None:
    """SyncBN (on GPU ranks) and DDP across ranks: what runs forward (never what is saved)."""
    distribute(run.state, run.env, sync_bn=run.cfg.sync_bn)


def _checkpoint(run: _Run) -> dict[str, Any]:
    state = run.state
    return {
        "format": SEGMENTATION_CHECKPOINT_FORMAT, "config": run.model.config.to_dict(),
        "model": cpu_state_dict(state.raw_model), "class_names": run.class_names,
        "preprocessing": DEEPLAB_PREPROCESSING.to_dict(),
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "epoch": state.epoch, "step": state.step, "epoch_step": state.epoch_step,
        "epoch_samples": state.epoch_samples, "epoch_stats": dict(state.epoch_stats),
        "rng": runtime.gather_objects(capture_rng()), "train_config": run.cfg.to_dict(),
        "history": run.history, "best_miou": run.best_miou,
    }


def _train(run: _Run, hooks: StepHooks) -> dict[str, Any]:
    cfg, env, state, out = run.cfg, run.env, run.state, run.out
    progress = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and env.is_main
    schedule = RecoverySchedule(cfg.save_interval, state.step) if cfg.save_interval else None

    def save_last() -> None:
        ckpt = _checkpoint(run)
        if env.is_main:
            save_checkpoint(ckpt, out / "last.pt")
        if schedule is not None:
            schedule.saved(state.step)

    with StopSignals() as stop:
        while state.epoch < cfg.epochs:
            run.train_sampler.set_epoch(state.epoch, start=state.epoch_samples)
            result = train_one_epoch(state, run.train_loader, should_stop=lambda: stop.signum is not None,
                                     save_due=schedule.due if schedule is not None else lambda step: False,
                                     save=save_last, hooks=hooks, progress=progress)
            if result.interrupted:
                save_last()
                raise TrainingInterrupted(stop.signum, out / "last.pt")
            scores = evaluate_segmentation(state.raw_model, run.val_loader, num_classes=run.model.num_classes,
                                           device=env.device, progress=progress)
            metrics = {"epoch": state.epoch + 1, "step": state.step, "train_loss": result.train_loss,
                       "train_pixel_accuracy": result.train_top1, "val_miou": scores.miou,
                       "val_pixel_accuracy": scores.pixel_accuracy, "lr": state.optimizer.param_groups[0]["lr"],
                       "images_per_s": result.images_per_s}
            run.history.append(metrics)
            is_best = scores.miou > run.best_miou
            run.best_miou = max(run.best_miou, scores.miou)
            state.epoch += 1
            state.epoch_step, state.epoch_samples = 0, 0
            state.epoch_stats = {k: 0.0 for k in state.epoch_stats}
            save_last()
            if env.is_main:
                if is_best:
                    link_or_copy(out / "last.pt", out / "best.pt")
                text = "".join(json.dumps(m) + "\n" for m in run.history)
                atomic_write(out / "metrics.jsonl", lambda f, text=text: f.write(text), mode="w")
                log.info("epoch %d/%d  train_loss %.4f  val_mIoU %.2f%%  val_pixel_acc %.2f%%  %.1f img/s",
                         metrics["epoch"], cfg.epochs, result.train_loss, 100 * scores.miou,
                         100 * scores.pixel_accuracy, result.images_per_s)
            if stop.signum is not None:
                raise TrainingInterrupted(stop.signum, out / "last.pt")
    return _summary(out, state.epoch, state.step, run.best_miou, run.history)


def _summary(out: Path, epochs: int, steps: int, best_miou: float, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run_dir": str(out), "epochs": epochs, "steps": steps, "best_val_miou": best_miou,
            "last": history[-1] if history else None, "last_pt": str(out / "last.pt"), "best_pt": str(out / "best.pt")}
