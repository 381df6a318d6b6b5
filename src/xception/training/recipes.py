"""What a training run is: :class:`Recipe` defaults (``paper``, ``finetune``) and the
:class:`TrainConfig` of one run, whose unset fields the recipe fills."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import parse_save_interval


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
                       train_scale=0.25),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``None`` means "the recipe's value" (``image_size`` and ``crop_pct``:
    the preprocessing of the ``pretrained`` weights, else :class:`~xception.Preprocessing`'s).

    ``data``: ``"digits"``, a folder of class folders, or WebDataset shards (a brace pattern or a
    list file, see :mod:`.shards`), whose validation data is ``val_data``. ``resume``: ``None``
    (a new run), ``""`` (``out/last.pt``), a checkpoint path, or ``"auto"`` (``out/last.pt`` when
    it exists, else a new run). ``save_interval``: also save ``last.pt`` inside an epoch every
    ``"10min"`` or ``"500steps"``.
    """

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
    crop_pct: float | None = None
    val_split: float | None = None
    val_data: str | None = None
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
    save_interval: str | None = None
    progress: bool | None = None  # None: when stderr is a terminal
    tensorboard: bool | None = None  # None: when the tensorboard extra is installed

    def resolved(self) -> "TrainConfig":
        """Fill the ``None`` fields from the recipe and check every value."""
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        r = RECIPES[self.recipe]
        fill = {f.name: getattr(r, f.name) for f in dataclasses.fields(Recipe)
                if hasattr(self, f.name) and getattr(self, f.name) is None}
        cfg = dataclasses.replace(self, **fill)
        for name in ("epochs", "batch_size", "accum_steps"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or cfg.image_size < 1):
            raise ValueError(f"image_size must be an integer >= 1, got {cfg.image_size!r}")
        if not cfg.lr > 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay!r}")
        if not 0.0 < cfg.train_scale <= 1.0:
            raise ValueError(f"train_scale must be in (0, 1], got {cfg.train_scale!r}")
        if cfg.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
        if cfg.save_interval is not None:
            parse_save_interval(cfg.save_interval)
        if cfg.workers < 0:
            raise ValueError(f"workers must be >= 0, got {cfg.workers!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
