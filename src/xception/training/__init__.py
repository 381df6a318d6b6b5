"""Training: the epoch engine, checkpoints, recipes and reports (data: :mod:`xception.data`;
devices and torchrun: :mod:`xception.runtime`; the validation pass: :mod:`xception.inference.evaluate`).

    engine        train_one_epoch over a TrainState
    checkpoint    checkpoint contents, exact-resume random state, recovery-save schedule
    recipes       Recipe (paper, finetune) and the TrainConfig of a run
    reporting     metrics.jsonl, curves.png, TensorBoard events
    trainer       fit(): one run, wired together
"""

from .recipes import RECIPES, Recipe, TrainConfig
from .trainer import TrainingInterrupted, fit

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainingInterrupted", "fit"]
