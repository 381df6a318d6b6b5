"""``xception quantize``: calibrate static int8 (:mod:`.static`) on a user's training images and
write the file the inference commands run in int8."""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader, Dataset

from ...data.images import collate_skip, warn_unreadable
from ...data.splits import keyed, open_split, seeded_subset
from ...weights import load_pretrained
from .static import StaticInt8, calibrate_static, save_int8

log = logging.getLogger(__name__)


def calibration_set(data, preprocessing, count: int, *, seed: int = 0, val_split: float | None = None) -> Dataset:
    """``count`` training images of ``data`` (``"digits"``, a folder with ``train/``, or a class
    folder; with ``val_split``, its training part), drawn by a seeded shuffle and preprocessed for
    evaluation (no augmentation): the images a static int8 calibration sees."""
    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    return seeded_subset(open_split(data, "train", preprocessing.eval_transform(), val_split=val_split), count, seed)


def quantize_weights(weights, data, out, *, images: int = 128, batch_size: int = 16, seed: int = 0,
                     val_split: float | None = None, image_size: int | None = None,
                     crop_pct: float | None = None, progress: bool = True) -> StaticInt8:
    """``xception quantize``: calibrate static int8 for ``weights`` on ``images`` training images of
    ``data`` and write it to ``out`` (:func:`save_int8`); returns the :class:`StaticInt8`."""
    model = load_pretrained(None, weights).eval()
    model.preprocessing = model.preprocessing.replace(image_size=image_size, crop_pct=crop_pct)
    subset, sampler = keyed(calibration_set(data, model.preprocessing, images, seed=seed, val_split=val_split),
                            train=False)
    skipped = 0

    def batches():
        nonlocal skipped
        for batch in DataLoader(subset, batch_size=batch_size, sampler=sampler, collate_fn=collate_skip):
            skipped += warn_unreadable(batch)
            if len(batch.indices):
                yield batch.images

    quantized = calibrate_static(model, batches(), progress=progress, info={
        "weights": str(weights), "calibration_data": str(data), "seed": seed,
        "image_size": model.preprocessing.image_size})
    if skipped:
        log.warning("calibration skipped %d unreadable images", skipped)
    save_int8(quantized, out)
    return quantized
