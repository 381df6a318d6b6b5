"""``xception quantize``: calibrate static int8 (:mod:`.quantize`) on a user's training images and
write the file the inference commands run in int8."""

from __future__ import annotations

import logging

import torch

from .classify import load_model
from .quantize import calibrate_static, save_int8

log = logging.getLogger(__name__)


def calibration_set(data, preprocessing, count: int, *, seed: int = 0, val_split: float | None = None):
    """``count`` training images of ``data`` (``"digits"``, a folder with ``train/``, or a class
    folder; with ``val_split``, its training part), drawn by a seeded shuffle and preprocessed for
    evaluation (no augmentation): the images a static int8 calibration sees."""
    from pathlib import Path

    from torch.utils.data import Subset

    from ..training.data import DIGITS, DigitsDataset, SafeImageFolder, build_datasets

    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    transform = preprocessing.eval_transform()
    if str(data) == DIGITS:
        train = DigitsDataset("train", transform)
    elif val_split is None and Path(data).is_dir():
        root = Path(data)
        train = SafeImageFolder(root / "train" if (root / "train").is_dir() else root, transform)
    else:
        train = build_datasets(data, preprocessing, val_split=val_split).train
        base = train.dataset if isinstance(train, Subset) else train
        base.transform = transform
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return Subset(train, sorted(order))


def quantize_weights(weights, data, out, *, images: int = 128, batch_size: int = 16, seed: int = 0,
                     val_split: float | None = None, image_size: int | None = None,
                     crop_pct: float | None = None, progress: bool = True):
    """``xception quantize``: calibrate static int8 for ``weights`` on ``images`` training images of
    ``data`` and write it to ``out`` (:func:`save_int8`); returns the :class:`StaticInt8`."""
    from torch.utils.data import DataLoader

    model = load_model(weights, device="cpu", image_size=image_size, crop_pct=crop_pct, int8=False)
    subset = calibration_set(data, model.preprocessing, images, seed=seed, val_split=val_split)
    skipped = 0

    def batches():
        nonlocal skipped
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=_collate_readable)
        for x, bad in loader:
            skipped += bad
            if x is not None:
                yield x

    quantized = calibrate_static(model, batches(), progress=progress, info={
        "weights": str(weights), "calibration_data": str(data), "seed": seed,
        "image_size": model.preprocessing.image_size})
    if skipped:
        log.warning("calibration skipped %d unreadable images", skipped)
    save_int8(quantized, out)
    return quantized


def _collate_readable(batch):
    good = [img for img, _ in batch if img is not None]
    return (torch.stack(good) if good else None), len(batch) - len(good)
