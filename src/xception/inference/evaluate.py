"""Evaluation: top-1, top-5, loss, per-class accuracy and the confusion matrix of a model on data.

:func:`evaluate` is the pass itself (training calls it for its validation each epoch);
:func:`evaluate_checkpoint` is ``xception eval``: any weights (our checkpoints, ``.safetensors``,
Keras / timm files) on the held-out part of any data (:func:`xception.data.open_split`: digits,
folders, WebDataset shards), preprocessed as the weights say. Under ``torchrun`` the images are
sharded across ranks and the metrics summed over them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import collate_skip, warn_unreadable
from ..data.shards import is_shard_spec, webdataset
from ..data.splits import keyed, open_split
from ..runtime import all_reduce_sum, amp_dtype, autocast, cleanup, setup, to_device
from ..runtime import progress as progress_bar
from . import explain as cam
from .classify import load_for_inference
from .report import MistakeWatch, write_report


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, num_classes: int, device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix, summed over all ranks.

    ``model`` must be a plain module (not DDP-wrapped): ranks may see different numbers of batches.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top5 correct, skipped
    k = min(5, num_classes)
    for batch in progress_bar(loader, len(loader), "eval", progress):  # type: ignore[arg-type]
        images, targets = batch.images, batch.targets
        sums[2] += warn_unreadable(batch)
        if len(targets) == 0:
            continue
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        sums[1] += (topk == targets[:, None]).any(dim=1).sum()
        pred = topk[:, 0]
        confusion.index_put_((targets, pred), torch.ones_like(pred, dtype=torch.float64), accumulate=True)
    confusion = all_reduce_sum(confusion)
    sums = all_reduce_sum(sums)
    count = confusion.sum().item()
    n = max(count, 1.0)
    per_class_total = confusion.sum(1)
    per_class = (confusion.diag() / per_class_total.clamp(min=1)).tolist()
    return {
        "loss": sums[0].item() / n,
        "top1": confusion.diag().sum().item() / n,
        "top5": sums[1].item() / n,
        "count": int(count),
        "skipped": int(sums[2].item()),
        "per_class": [acc if total > 0 else None for acc, total in zip(per_class, per_class_total.tolist())],
        "confusion": confusion.long().tolist(),
    }


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, device: str = "auto", batch_size: int = 64,
                        workers: int = 2, val_split: float | None = None, amp: str = "auto",
                        image_size: int | None = None, crop_pct: float | None = None,
                        report: str | Path | None = None, cam_layer: str | None = None) -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and confusion matrix of any weights on ``data``.

    ``report``: a folder for the evaluation report (:mod:`.report`: confusion matrix, per-class
    precision / recall / F1, the most confident mistakes with their Grad-CAM maps, taken at
    ``cam_layer``: default the last feature map).
    """
    if is_shard_spec(data):
        webdataset()  # a missing extra is named before any work
    env = setup(device)
    try:
        model, classes, preprocessing, tc = load_for_inference(checkpoint, env.device, image_size=image_size,
                                                               crop_pct=crop_pct)
        if val_split is None and tc.get("val_split") and str(tc.get("data")) == str(data):
            val_split = tc["val_split"]  # the run's own held-out part
        ds = open_split(data, "val", preprocessing.eval_transform(), val_split=val_split, classes=classes)
        keyed_ds, sampler = keyed(ds, train=False, num_replicas=env.world_size, rank=env.rank)
        loader = DataLoader(keyed_ds, batch_size=batch_size, num_workers=workers, sampler=sampler,
                            collate_fn=collate_skip)
        watch = MistakeWatch(model) if report is not None else None
        if watch is not None:
            # a layer that does not exist: before the pass (Grad-CAM of an int8 model: its fp32 weights)
            cam.target_layer(cam.FeatureMapModel(getattr(model, "float_model", model)), cam_layer)
        result = evaluate(watch or model, watch.batches(loader) if watch else loader, num_classes=len(classes),
                          device=env.device, amp_dtype=amp_dtype(amp, env.device), channels_last=True)
    finally:
        cleanup()
    result["per_class"] = {c: acc for c, acc in zip(classes, result["per_class"])}
    result["class_names"] = classes
    result["checkpoint"] = str(checkpoint)
    result["data"] = str(data)
    if watch is not None and env.rank == 0:
        result["report"] = write_report(report, result, getattr(model, "float_model", model), watch, preprocessing,
                                        cam_layer)
    return result
