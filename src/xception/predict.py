"""Evaluation and prediction from a training checkpoint.

Both read the checkpoint safely (``weights_only=True``), rebuild its model with the EMA weights
when it has them, and preprocess exactly as the run's validation did (its image size and crop).
Under ``torchrun`` the images are sharded across ranks; evaluation metrics are summed over ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from .checkpoint import atomic_write, load_checkpoint, model_from_checkpoint
from .data import (DIGITS, DigitsDataset, ImagePaths, IndexedDataset, SafeImageFolder, ShardSampler,
                   collate_paths, collate_skip, eval_transform, expand_inputs)
from .engine import autocast, evaluate

log = logging.getLogger(__name__)


def load_for_inference(path: str | Path, device: torch.device, *, channels_last: bool = True):
    """``(model, class_names, image_size, crop_pct, train_config)`` from one of our checkpoints."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path=path)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    tc = ckpt.get("train_config") or {}
    size = int(tc.get("image_size") or 299)
    crop_pct = float(tc.get("crop_pct") or 0.875)
    classes = ckpt.get("class_names") or [str(i) for i in range(model.config.num_classes)]
    return model, list(classes), size, crop_pct, tc


def eval_dataset(data: str | Path, classes: Sequence[str], transform, val_split: float | None = None) -> Dataset:
    """The held-out images of ``data``: digits' val split, ``DATA/val``, the ``val_split`` part of a
    class-folder tree (same split as training), or else every image under ``DATA/<class>/``."""
    if str(data) == DIGITS:
        ds: Dataset = DigitsDataset("val", transform)
        found = DigitsDataset.classes
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root} (give a folder of images or 'digits')")
        if (root / "val").is_dir():
            ds = SafeImageFolder(root / "val", transform, classes=classes)
        elif val_split is not None:
            from .data import build_datasets  # the same stratified split as training

            ds = build_datasets(root, image_size=1, val_split=val_split).val
            ds.dataset.transform = transform  # type: ignore[attr-defined]
        else:
            ds = SafeImageFolder(root, transform, classes=classes)
        found = list(classes)
    if list(found) != list(classes):
        raise ValueError(f"{data} has classes {found}, the checkpoint has {list(classes)}")
    return ds


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, device: str = "auto", batch_size: int = 64,
                        workers: int = 2, val_split: float | None = None, amp: str = "auto") -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and confusion matrix of a checkpoint on ``data``."""
    from .train import amp_dtype

    env = D.setup(device)
    try:
        model, classes, size, crop_pct, tc = load_for_inference(checkpoint, env.device)
        if val_split is None and tc.get("val_split") and str(tc.get("data")) == str(data):
            val_split = tc["val_split"]  # the run's own held-out part
        ds = eval_dataset(data, classes, eval_transform(size, crop_pct), val_split)
        loader = DataLoader(IndexedDataset(ds), batch_size=batch_size, num_workers=workers,
                            sampler=ShardSampler(len(ds), num_replicas=env.world_size, rank=env.rank),
                            collate_fn=collate_skip)
        result = evaluate(model, loader, num_classes=len(classes), device=env.device,
                          amp_dtype=amp_dtype(amp, env.device), channels_last=True)
    finally:
        D.cleanup()
    result["per_class"] = {c: acc for c, acc in zip(classes, result["per_class"])}
    result["class_names"] = classes
    result["checkpoint"] = str(checkpoint)
    result["data"] = str(data)
    return result


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: str | Path) -> None:
    """A confusion-matrix PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 20), min(2 + 0.5 * n, 20)))
    ax.imshow(confusion, cmap="Blues")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if confusion[i][j]:
                        ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def predict(checkpoint: str | Path, inputs: Sequence[str], *, topk: int = 5, device: str = "auto",
            batch_size: int = 64, workers: int = 2, amp: str = "auto") -> Iterator[dict[str, Any]]:
    """Yield ``{"path", "top": [{"class", "prob"}, ...]}`` or ``{"path", "error"}`` per image.

    ``inputs`` are files, folders or globs. Results come in input order (this rank's share of the
    inputs under ``torchrun``). Raises ``FileNotFoundError`` before any work for a missing input.
    """
    from .train import amp_dtype

    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk!r}")
    env = D.setup(device)
    try:
        model, classes, size, crop_pct, _ = load_for_inference(checkpoint, env.device)
        paths = expand_inputs(inputs)[env.rank::env.world_size]
        loader = DataLoader(ImagePaths(paths, eval_transform(size, crop_pct)), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_paths)
        k = min(topk, len(classes))
        dtype = amp_dtype(amp, env.device)
        for images, ok, failed in loader:
            rows: dict[int, dict[str, Any]] = {i: {"path": str(paths[i]), "error": msg} for i, msg in failed}
            if images is not None:
                images = images.to(env.device).contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast(env.device, dtype):
                    probs = model(images).float().softmax(dim=1)
                p, idx = probs.topk(k, dim=1)
                for i, pi, ii in zip(ok, p.tolist(), idx.tolist()):
                    rows[i] = {"path": str(paths[i]),
                               "top": [{"class": classes[c], "prob": q} for c, q in zip(ii, pi)]}
            for i in sorted(rows):
                yield rows[i]
    finally:
        D.cleanup()
