"""Segmentation inference and mIoU: one image at any size, at one or several scales, with flip.

mIoU the official way: one confusion matrix over every labelled pixel of the split (summed over
ranks under ``torchrun``), then IoU per class and their mean (:mod:`..inference.segmentation_metrics`).
Several scales average the softmax of each scale's logits resized to the image (TensorFlow
DeepLab's multi-scale inference), a flip adds the mirrored image's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import runtime
from ..inference.segmentation_metrics import ConfusionMatrix, SegmentationScores

log = logging.getLogger(__name__)


@torch.no_grad()
def segment_logits(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> torch.Tensor:
    """(B, num_classes, H, W) class scores of (B, 3, H, W) normalised images: logits at one scale
    without flip, else the mean softmax over scales (and mirrored images)."""
    size = image.shape[-2:]
    if tuple(scales) == (1.0,) and not flip:
        return model(image)
    total = None
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, size=[max(1, round(size[0] * scale)), max(1, round(size[1] * scale))], mode="bilinear",
            align_corners=True)
        views = [scaled, scaled.flip(-1)] if flip else [scaled]
        for i, view in enumerate(views):
            logits = model(view)
            if i == 1:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).softmax(1)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


@dataclass
class Evaluation:
    """Scores of a split, and each image's own pixel accuracy / mIoU (for the report's worst images)."""

    scores: SegmentationScores
    per_image: list[tuple[int, float]] = field(default_factory=list)  # (dataset index, image mIoU)


def evaluate_segmentation(model: nn.Module, loader: Iterable, *, num_classes: int, device: torch.device,
                          scales: Sequence[float] = (1.0,), flip: bool = False, progress: bool = False,
                          per_image: bool = False, ignore_index: int = 255) -> SegmentationScores | Evaluation:
    """Confusion matrix of ``model`` over ``loader`` (batches of ``(images, masks, indices)``), summed
    over ranks; ``per_image`` also keeps each image's mIoU."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device=device)
    images_scored: list[tuple[int, float]] = []
    try:
        total = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
        for batch in runtime.progress(loader, total, "eval", progress):
            images, masks, indices = batch.images, batch.targets, batch.indices
            if len(images) == 0:
                continue
            pred = segment_logits(model, images.to(device), scales, flip).argmax(1)
            masks = masks.to(device)
            matrix.update(pred, masks)
            if per_image:
                for i in range(len(images)):
                    one = ConfusionMatrix(num_classes, ignore_index, device=device)
                    one.update(pred[i], masks[i])
                    images_scored.append((int(indices[i]), one.compute().miou))
    finally:
        model.train(was_training)
    scores = matrix.all_reduce().compute()
    return Evaluation(scores, images_scored) if per_image else scores
