"""Evaluation and prediction from a training checkpoint.

Both read the checkpoint safely (``weights_only=True``), rebuild its model with the EMA weights
when it has them, and preprocess exactly as the run's validation did (the checkpoint's
:class:`~xception.Preprocessing`).
Under ``torchrun`` the images are sharded across ranks; evaluation metrics are summed over ranks.
Evaluation also reads WebDataset shards (:mod:`xception.training.shards`): each rank its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..preprocessing import Preprocessing
from ..training import distributed as D
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.data import (DIGITS, DigitsDataset, ImagePaths, SafeImageFolder, build_datasets, collate_paths,
                             collate_skip, expand_inputs)
from ..training.shards import ShardDataset, is_shard_spec, keyed, open_shards, webdataset
from ..training.engine import amp_dtype, autocast, evaluate

log = logging.getLogger(__name__)


def load_for_inference(path: str | Path, device: torch.device, *, channels_last: bool = True):
    """``(model, class_names, preprocessing, train_config)`` from one of our checkpoints; the model
    in eval mode on ``device`` with the EMA weights when the run kept them."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path=path)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    classes = model.class_names or [str(i) for i in range(model.config.num_classes)]
    return model, list(classes), model.preprocessing, ckpt.get("train_config") or {}


def eval_dataset(data: str | Path, classes: Sequence[str], transform, val_split: float | None = None) -> Dataset:
    """The held-out images of ``data``: digits' val split, ``DATA/val``, the ``val_split`` part of a
    class-folder tree (same split as training), every image under ``DATA/<class>/``, or shards."""
    if str(data) == DIGITS:
        ds: Dataset = DigitsDataset("val", transform)
        found = DigitsDataset.classes
    elif is_shard_spec(data):
        ds = ShardDataset(open_shards(str(data)), transform)
        found = ds.classes  # type: ignore[attr-defined]
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root} (give a folder of images or 'digits')")
        if (root / "val").is_dir():
            ds = SafeImageFolder(root / "val", transform, classes=classes)
        elif val_split is not None:
            ds = build_datasets(root, Preprocessing(image_size=1), val_split=val_split).val  # training's split
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
    if is_shard_spec(data):
        webdataset()  # a missing extra is named before any work
    env = D.setup(device)
    try:
        model, classes, preprocessing, tc = load_for_inference(checkpoint, env.device)
        if val_split is None and tc.get("val_split") and str(tc.get("data")) == str(data):
            val_split = tc["val_split"]  # the run's own held-out part
        ds = eval_dataset(data, classes, preprocessing.eval_transform(), val_split)
        keyed_ds, sampler = keyed(ds, train=False, num_replicas=env.world_size, rank=env.rank)
        loader = DataLoader(keyed_ds, batch_size=batch_size, num_workers=workers, sampler=sampler,
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


def predict(checkpoint: str | Path, inputs: Sequence[str], *, topk: int = 5, device: str = "auto",
            batch_size: int = 64, workers: int = 2, amp: str = "auto") -> Iterator[dict[str, Any]]:
    """Yield ``{"path", "top": [{"class", "prob"}, ...]}`` or ``{"path", "error"}`` per image.

    ``inputs`` are files, folders or globs. Results come in input order (this rank's share of the
    inputs under ``torchrun``). Raises ``FileNotFoundError`` before any work for a missing input.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk!r}")
    env = D.setup(device)
    try:
        model, classes, preprocessing, _ = load_for_inference(checkpoint, env.device)
        paths = expand_inputs(inputs)[env.rank::env.world_size]
        loader = DataLoader(ImagePaths(paths, preprocessing.eval_transform()), batch_size=batch_size,
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
