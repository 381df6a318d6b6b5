"""Training: data, the epoch engine, checkpoints, distributed runs, recipes and reports.

    data          datasets (digits, image folders), samplers, per-sample seeded augmentation
    shards        WebDataset tar shards: writing them, streaming them (epochs, ranks, exact resume)
    engine        train_one_epoch / evaluate over a TrainState
    checkpoint    checkpoint contents, exact-resume random state, recovery-save schedule
    distributed   torchrun environment -> process group
    recipes       Recipe (paper, finetune) and the TrainConfig of a run
    reporting     metrics.jsonl, curves.png, TensorBoard, confusion matrices
    trainer       fit(): one run, wired together
"""

from .recipes import RECIPES, Recipe, TrainConfig
from .trainer import TrainingInterrupted, fit

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainingInterrupted", "fit"]
