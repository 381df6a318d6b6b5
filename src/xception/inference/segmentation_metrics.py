"""Semantic segmentation scores the official way: one confusion matrix over every pixel of the split.

PASCAL VOC's mIoU (and DeepLab's) is computed from the counts of the whole split, not averaged
over images: a small image weighs what its pixels weigh. Under DDP each rank counts its own
images and one ``all_reduce`` sums the matrices before :meth:`ConfusionMatrix.compute`::

    cm = ConfusionMatrix(21)
    for images, masks in loader:
        cm.update(model(images).argmax(1), masks)
    scores = cm.all_reduce().compute()  # the same numbers on every rank

Conventions: a class absent from both the targets and the predictions has IoU NaN and is left out
of the mean (torchmetrics' ``MulticlassJaccardIndex`` reports 0 for it with ``average=None`` and,
in torchmetrics 1.9, leaves it out of ``"macro"`` too); a class predicted but never present has
IoU 0. Its recall is NaN and left out of ``mean_accuracy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix; ``iou`` is (num_classes,) float64, NaN where undefined."""

    iou: torch.Tensor
    miou: float  # mean of the defined IoUs
    pixel_accuracy: float  # correct pixels / counted pixels
    mean_accuracy: float  # mean per-class recall over classes present in the targets
    frequency_weighted_iou: float  # IoU weighted by each class's share of target pixels

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Plain numbers for JSON: per-class IoU by name (default: the index), NaN as None."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"{len(self.iou)} classes scored but {len(names)} class names given")

        def plain(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"miou": plain(self.miou), "pixel_accuracy": plain(self.pixel_accuracy),
                "mean_accuracy": plain(self.mean_accuracy),
                "frequency_weighted_iou": plain(self.frequency_weighted_iou),
                "iou": {name: plain(v) for name, v in zip(names, self.iou.tolist())}}


class ConfusionMatrix:
    """Pixel counts by (target class, predicted class), accumulated in int64 over updates.

    Args:
        num_classes: classes 0 .. num_classes - 1.
        ignore_index: target value of pixels left out (VOC's object borders, padding).
        device: where the counts live; by default they follow the first update's tensors.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._device_fixed = device is not None
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)  # rows: target

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count the pixels of ``pred`` (class indices, not logits) against ``target``, any equal shapes."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must hold class indices (argmax the logits first), got "
                             f"{pred.dtype} and {target.dtype}")
        if not self._device_fixed and self.matrix.device != target.device and not self.matrix.any():
            self.matrix = self.matrix.to(target.device)  # count where the batches are: no copy per update
        keep = target != self.ignore_index
        target, pred = target[keep].long(), pred[keep].long()  # long first: uint8 * num_classes would wrap
        k = self.num_classes
        for name, values in (("target", target), ("pred", pred)):
            outside = (values < 0) | (values >= k)
            if outside.any():  # one sync per update; a wrong value would silently land in another cell
                raise ValueError(f"{name} holds class index {values[outside][0].item()}, outside [0, {k})"
                                 + (f" and not the ignore index {self.ignore_index}" if name == "target" else ""))
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to these (e.g. matrices of separate evaluation runs); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                             f"{self.num_classes}-class one (ignore {self.ignore_index})")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts of every rank in place (a no-op outside ``torch.distributed``); call it once,
        after the last update, on every rank. Returns self."""
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            counts = self.matrix.to(device) if device is not None else self.matrix
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            self.matrix = counts.to(self.matrix.device)
        return self

    def compute(self) -> SegmentationScores:
        counts = self.matrix.double().cpu()
        correct, in_target, in_pred = counts.diagonal(), counts.sum(1), counts.sum(0)
        total = counts.sum()
        iou = correct / (in_target + in_pred - correct)  # 0 / 0 = NaN: the class is absent from both
        recall = correct / in_target
        present = in_target > 0
        return SegmentationScores(
            iou=iou,
            miou=iou.nanmean().item(),
            pixel_accuracy=(correct.sum() / total).item(),
            mean_accuracy=recall.nanmean().item(),
            frequency_weighted_iou=((in_target[present] / total) * iou[present]).sum().item() if total else math.nan,
        )
