"""Evaluation and prediction with any weights: our checkpoints, ``.safetensors``, Keras / timm files.

Both read the weights safely (``weights_only=True``, h5py, safetensors), rebuild their model (a
checkpoint's with the EMA weights when it has them) and preprocess as the weights say: a run's own
validation settings, Keras's or timm's (:class:`~xception.Preprocessing`; flags override it).
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
from ..training.data import (DIGITS, DigitsDataset, ImagePaths, SafeImageFolder, build_datasets, collate_paths,
                             collate_skip)
from ..training.shards import ShardDataset, is_shard_spec, keyed, open_shards, webdataset
from ..training.engine import amp_dtype, autocast, evaluate
from ..weights import read_weights, resolve_source
from . import explain as cam
from .classify import decode_predictions, gather_images, load_model
from .report import MistakeWatch, write_report

log = logging.getLogger(__name__)


def load_for_inference(weights: str | Path, device: torch.device, *, channels_last: bool = True,
                       image_size: int | None = None, crop_pct: float | None = None):
    """``(model, class_names, preprocessing, train_config)`` from any weights ``--weights`` takes (a
    checkpoint's ``train_config``, else ``{}``); the model in eval mode on ``device`` (a checkpoint's
    EMA weights when the run kept them)."""
    file = read_weights(resolve_source(weights))
    model = load_model(file, device=device, image_size=image_size, crop_pct=crop_pct)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, model.class_names, model.preprocessing, file.train_config


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
    if report is not None:
        cam.grad_cam_library()
    env = D.setup(device)
    try:
        model, classes, preprocessing, tc = load_for_inference(checkpoint, env.device, image_size=image_size,
                                                               crop_pct=crop_pct)
        if val_split is None and tc.get("val_split") and str(tc.get("data")) == str(data):
            val_split = tc["val_split"]  # the run's own held-out part
        ds = eval_dataset(data, classes, preprocessing.eval_transform(), val_split)
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
        D.cleanup()
    result["per_class"] = {c: acc for c, acc in zip(classes, result["per_class"])}
    result["class_names"] = classes
    result["checkpoint"] = str(checkpoint)
    result["data"] = str(data)
    if watch is not None and env.rank == 0:
        result["report"] = write_report(report, result, getattr(model, "float_model", model), watch, preprocessing,
                                        cam_layer)
    return result


def predict(checkpoint: str | Path, inputs: Sequence[str], *, topk: int = 5, device: str = "auto",
            batch_size: int = 64, workers: int = 2, amp: str = "auto", image_size: int | None = None,
            crop_pct: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"path", "top": [{"class", "prob"}, ...]}`` or ``{"path", "error"}`` per image.

    ``checkpoint``: any weights (``"keras"``, ``"timm"``, a file, a training checkpoint). ``inputs``
    are files, folders or globs. Results come in input order (this rank's share of the inputs under
    ``torchrun``). A missing, unreadable or non-image input is an error row; the rest are classified.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk!r}")
    env = D.setup(device)
    try:
        model, classes, preprocessing, _ = load_for_inference(checkpoint, env.device, image_size=image_size,
                                                              crop_pct=crop_pct)
        entries = gather_images(inputs)[env.rank::env.world_size]
        paths = [path for path, _ in entries]
        loader = DataLoader(ImagePaths(paths, preprocessing.eval_transform()), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_paths)
        dtype = amp_dtype(amp, env.device)
        for images, ok, failed in loader:
            rows: dict[int, dict[str, Any]] = {i: {"path": str(paths[i]), "error": entries[i][1] or msg}
                                               for i, msg in failed}
            if images is not None:
                images = images.to(env.device).contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast(env.device, dtype):
                    probs = model(images).float().softmax(dim=1)
                for i, top in zip(ok, decode_predictions(probs.cpu(), topk, classes)):
                    rows[i] = {"path": str(paths[i]), "top": [{"class": t.label, "prob": t.prob} for t in top]}
            for i in sorted(rows):
                yield rows[i]
    finally:
        D.cleanup()
