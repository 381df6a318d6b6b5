"""``xception segment eval``: a split scored with any DeepLabv3+ weights, and its report.

The report folder gets ``scores.json`` (everything below), ``per_class.md`` (IoU per class, best
last) and ``worst/``: the images with the lowest mIoU of their own, each as one PNG of the photo,
the true mask and the predicted mask side by side.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.images import collate_skip
from ..data.sampling import IndexedDataset, ShardSampler
from ..data.segmentation import (
    SegmentationDataset,
    SegmentationEvalTransform,
    voc_palette,
)
from ..fileio import atomic_write
from ..runtime import resolve_device
from .evaluate import evaluate_segmentation, segment_logits
from .weights import load_deeplab


def evaluate_split(weights: str | os.PathLike, data: str | os.PathLike, *, split: str = "val",
                   output_stride: int | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                   device: str = "auto", report: str | os.PathLike | None = None, worst: int = 8,
                   progress: bool | None = None) -> dict[str, Any]:
    """Scores of ``weights`` on ``split`` of ``data`` as a plain dict; ``report``: also write the report."""
    model = load_deeplab(weights, **({"output_stride": output_stride} if output_stride else {}))
    dev = resolve_device(device)
    model = model.to(dev)
    dataset = SegmentationDataset(data, split, num_classes=model.num_classes,
                                  transform=SegmentationEvalTransform(model.preprocessing))
    loader = DataLoader(IndexedDataset(dataset), batch_size=1, sampler=ShardSampler(len(dataset)),
                        collate_fn=collate_skip)
    result = evaluate_segmentation(model, loader, num_classes=model.num_classes, device=dev, scales=scales,
                                   flip=flip, progress=bool(progress), per_image=report is not None)
    scores = result.scores if report is not None else result
    names = model.class_names or dataset.class_names
    if names is None or len(names) != model.num_classes:
        names = [str(i) for i in range(model.num_classes)]
    summary = {**scores.to_dict(names), "images": len(dataset), "split": split,
               "output_stride": model.config.output_stride, "scales": list(scales), "flip": flip,
               "weights": str(weights)}
    if report is not None:
        _write_report(Path(report), summary, result.per_image[:], dataset, model, dev, scales, flip, worst)
    return summary


def _write_report(out: Path, summary: dict[str, Any], per_image: list[tuple[int, float]], dataset, model,
                  device: torch.device, scales: Sequence[float], flip: bool, worst: int) -> None:
    (out / "worst").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scores.json", lambda f: f.write(json.dumps(summary, indent=2)), mode="w")
    rows = sorted(summary["iou"].items(), key=lambda kv: -1.0 if kv[1] is None else kv[1])
    table = "| class | IoU |\n|---|---:|\n" + "".join(
        f"| {name} | {'-' if iou is None else f'{100 * iou:.2f}%'} |\n" for name, iou in rows)
    table += f"| **mean** | **{100 * summary['miou']:.2f}%** |\n"
    atomic_write(out / "per_class.md", lambda f: f.write(table), mode="w")
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    ranked = sorted((p for p in per_image if not math.isnan(p[1])), key=lambda p: p[1])[:worst]
    for rank, (index, miou) in enumerate(ranked):
        raw_image, raw_mask = dataset.load(index)
        image, _ = dataset.transform(raw_image, raw_mask)
        with torch.no_grad():
            pred = segment_logits(model.eval(), image.unsqueeze(0).to(device), scales, flip).argmax(1)[0].cpu()
        photo = raw_image.permute(1, 2, 0).numpy().astype(np.uint8)
        truth = palette[np.asarray(raw_mask, dtype=np.int64).clip(0, 255)]
        panel = Image.fromarray(np.concatenate([photo, truth, palette[pred.numpy()]], axis=1))
        stem = Path(dataset.samples[index][0]).stem
        atomic_write(out / "worst" / f"{rank + 1:02d}_{stem}_miou{100 * miou:.0f}.png",
                     lambda f, panel=panel: panel.save(f, format="PNG"))
