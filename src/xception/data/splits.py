"""What a data argument names, turned into datasets: the one entry point for every command.

``DATA`` is ``"digits"`` (scikit-learn's 8x8 handwritten digits, a fixed stratified 80/20 split),
a folder of images (``DATA/train/<class>/*`` + ``DATA/val/<class>/*``, or one level of class
folders, split by ``val_split`` or read whole), or WebDataset shards (a brace pattern or a list
file, :mod:`.shards`; the shards name their split themselves). :func:`open_split` gives one split
of any of them; :func:`training_splits` both splits for a training run; :func:`keyed` the
``(dataset, sampler)`` pair a DataLoader reads them through on each rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Sampler, Subset

from ..preprocessing import Preprocessing
from .datasets import DIGITS, SPLITS, DigitsDataset, folder_split
from .sampling import EpochSampler, IndexedDataset, ShardSampler
from .shards import ShardDataset, StreamSampler, is_shard_spec, open_shards


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: list[str]


def open_split(data: str | os.PathLike, split: str, transform: Callable | None = None, *,
               val_split: float | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) of ``data``, transformed by ``transform``, with
    ``classes`` (and ``targets`` where the data is indexable).

    Digits: its fixed split. Shards: the shards ``data`` names, whichever split they hold. A
    folder: see :func:`.datasets.folder_split` (a flat folder without ``val_split`` is read whole).
    ``classes``: the class list the data must have (a model's): another is a ``ValueError``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if str(data) == DIGITS:
        dataset: Dataset = DigitsDataset(split, transform)
    elif is_shard_spec(data):
        dataset = ShardDataset(open_shards(str(data)), transform)
    else:
        return folder_split(data, split, transform, val_split=val_split, classes=classes)
    found = list(dataset.classes)  # type: ignore[attr-defined]
    if classes is not None and found != list(classes):
        raise ValueError(f"{data} has classes {found[:10]}, the model has {list(classes)[:10]}")
    return dataset


def training_splits(data: str, preprocessing: Preprocessing, *, train_scale: tuple[float, float] = (0.08, 1.0),
                    hflip: bool = True, val_split: float | None = None, val_data: str | None = None) -> DataSplits:
    """Train (augmented) and validation (evaluation transform) datasets of a training run.

    Digits and folders hold their validation part (``DATA/val`` or ``val_split``); training shards
    take it from ``val_data`` (validation shards, or a folder of class folders).
    """
    train_tf = preprocessing.train_transform(scale=train_scale, hflip=hflip)
    val_tf = preprocessing.eval_transform()
    if is_shard_spec(data):
        if val_split is not None:
            raise ValueError("--val-split splits a folder; for shards give the validation shards as --val-data")
        if val_data is None:
            raise ValueError(f"{data}: training on shards needs --val-data: validation shards or a folder of "
                             "class folders")
        train = open_split(data, "train", train_tf)
        val = open_split(val_data, "val", val_tf, classes=train.classes)  # type: ignore[attr-defined]
        return DataSplits(train, val, list(train.classes))  # type: ignore[attr-defined]
    if val_data is not None:
        raise ValueError(f"--val-data goes with shard data; {data} is not shards (its validation part is "
                         "DATA/val or --val-split)")
    root = Path(data)
    if str(data) != DIGITS and root.is_dir() and not (root / "train").is_dir() and val_split is None:
        raise ValueError(f"{root} has no train/ and val/ folders: give --val-split F to hold out a fraction")
    train = open_split(data, "train", train_tf, val_split=val_split)
    val = open_split(data, "val", val_tf, val_split=val_split, classes=train.classes)  # type: ignore[attr-defined]
    return DataSplits(train, val, list(train.classes))  # type: ignore[attr-defined]


def seeded_subset(dataset: Dataset, count: int, seed: int = 0) -> Subset:
    """``count`` samples of ``dataset`` (all of them if it holds fewer), drawn by a seeded shuffle,
    in dataset order."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()  # type: ignore[arg-type]
    return Subset(dataset, sorted(order))


def keyed(dataset: Dataset, *, train: bool, num_replicas: int = 1, rank: int = 0,
          seed: int = 0) -> tuple[Dataset, Sampler]:
    """``(dataset, sampler)`` for a DataLoader over any dataset of :func:`open_split`: keys in,
    ``(image | Unreadable, target, index)`` out (:func:`.images.collate_skip` stacks them); training
    shuffles per epoch with seeded augmentation, evaluation reads in order, each rank its share."""
    if isinstance(dataset, ShardDataset):
        return dataset, StreamSampler(dataset.shards, num_replicas=num_replicas, rank=rank, shuffle=train, seed=seed)
    if train:
        return IndexedDataset(dataset), EpochSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
    return IndexedDataset(dataset), ShardSampler(len(dataset), num_replicas=num_replicas, rank=rank)  # type: ignore[arg-type]
