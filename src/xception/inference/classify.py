"""Classify and explain photos with the weights people have: the Python API.

    clf = xception.Classifier("keras")            # or "timm", a .h5 / .pth / .safetensors file, a checkpoint
    clf("photo.jpg", topk=5)                      # [Prediction(label='golden retriever', prob=0.87, index=207), ...]
    clf.explain("photo.jpg", classes="golden retriever").save("why.png")   # Grad-CAM and Grad-CAM++

The model, its class names (ImageNet's for 1000-class Keras / timm files) and its preprocessing
come from the weights (:func:`xception.weights.load_pretrained`); ``image_size`` / ``crop_pct``
override the preprocessing. :func:`decode_predictions` plays the part of Keras's.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..data.images import ImageLike, read_image
from ..deploy.int8 import int8_model
from ..plotting import cam_figure
from ..preprocessing import Preprocessing
from ..runtime import resolve_device
from ..weights import WeightFile, load_pretrained, read_weights, resolve_source
from ..weights.imagenet import IMAGENET_NUM_CLASSES, imagenet_classes
from . import explain as cam


class Prediction(NamedTuple):
    """One class of a model's answer: its name, probability and index."""

    label: str
    prob: float
    index: int


def decode_predictions(probs: torch.Tensor | np.ndarray, top: int = 5,
                       class_names: Sequence[str] | None = None) -> list[list[Prediction]]:
    """The ``top`` classes of each row of ``probs`` (B, C), best first (Keras's ``decode_predictions``).

    ``class_names`` defaults to the ImageNet-1k names when there are 1000 columns.
    """
    probs = torch.as_tensor(probs).float()
    if probs.ndim != 2:
        raise ValueError(f"expected probabilities of shape (batch, classes), got {tuple(probs.shape)}")
    if class_names is None:
        if probs.shape[1] != IMAGENET_NUM_CLASSES:
            raise ValueError(f"{probs.shape[1]} classes: pass class_names (ImageNet's need 1000 columns)")
        class_names = imagenet_classes()
    if len(class_names) != probs.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} classes")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top!r}")
    p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
    return [[Prediction(class_names[i], q, i) for q, i in zip(pr, ir)] for pr, ir in zip(p.tolist(), idx.tolist())]


def class_index(target: str | int, class_names: Sequence[str]) -> int:
    """The index of a class given by name (case-insensitive) or number; a ValueError suggests close names."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit() and target not in class_names):
        index = int(target)
        if not 0 <= index < len(class_names):
            raise ValueError(f"class index {index} is out of range: the model has {len(class_names)} classes")
        return index
    lowered = [c.lower() for c in class_names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    close = difflib.get_close_matches(target.lower(), lowered, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(class_names[lowered.index(c)]) for c in close)}?" if close else ""
    raise ValueError(f"class {target!r} is not one of the model's {len(class_names)} classes{hint}")


def load_model(weights: str | os.PathLike | WeightFile, *, device: str | torch.device = "cpu",
               model_name: str | None = None, image_size: int | None = None,
               crop_pct: float | None = None, int8: bool = True) -> nn.Module:
    """The model ``weights`` imply, in eval mode on ``device``, with ``class_names`` (its file's, else
    ``"0"``, ``"1"``, ...) and ``preprocessing`` (the weights', ``image_size`` / ``crop_pct`` overriding).
    A file ``xception quantize`` wrote runs in int8 on a CPU (``int8=False``: its fp32 weights)."""
    model = load_pretrained(model_name, weights).to(device).eval()
    if not getattr(model, "num_classes", 0):
        raise ValueError(f"{weights}: weights without a classifier (e.g. keras_notop) cannot classify")
    model.class_names = list(model.class_names or [str(i) for i in range(model.num_classes)])
    model.preprocessing = model.preprocessing.replace(image_size=image_size, crop_pct=crop_pct)
    return int8_model(model, device) if int8 else model


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


@dataclass
class Explanation:
    """Class-activation maps of one image.

    Attributes:
        image: what the model saw (the preprocessed crop, de-normalised), (H, W, 3) in [0, 1].
        targets: the explained classes with their probabilities.
        heatmaps: method name -> (len(targets), H, W) maps in [0, 1].
        layer: the layer the maps were taken at.
    """

    image: np.ndarray
    targets: list[Prediction]
    heatmaps: dict[str, np.ndarray]
    layer: str

    def save(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """One PNG: per class, the image, then each method's heatmap and overlay."""
        rows = [f"{t.label}: {100 * t.prob:.1f}%" for t in self.targets]
        return cam_figure(path, self.image, rows, self.heatmaps, titles=cam.TITLES, title=title or f"layer: {self.layer}")


class Classifier:
    """An image classifier from any weights ``xception`` reads.

    Args:
        weights: ``"keras"``, ``"timm"`` (downloaded once), a Keras ``.h5``, timm ``.pth``, our
            ``.safetensors`` or a training checkpoint; or a model already loaded.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        model_name, image_size, crop_pct: see :func:`load_model`.
    """

    def __init__(self, weights: str | os.PathLike | nn.Module, *, device: str = "auto", model_name: str | None = None,
                 image_size: int | None = None, crop_pct: float | None = None, batch_size: int = 32) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if isinstance(weights, nn.Module):
            model = weights.to(self.device).eval()
            model.class_names = list(getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)])
            model.preprocessing = (getattr(model, "preprocessing", None) or Preprocessing()).replace(
                image_size=image_size, crop_pct=crop_pct)
        else:
            model = load_model(weights, device=self.device, model_name=model_name, image_size=image_size,
                               crop_pct=crop_pct)
        self.model = model
        self.class_names: list[str] = model.class_names
        self.preprocessing: Preprocessing = model.preprocessing
        self.batch_size = batch_size
        self._transform = self.preprocessing.eval_transform()

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(B, 3, S, S) model inputs."""
        return torch.stack([self._transform(read_image(im)) for im in images]).to(self.device)

    @torch.no_grad()
    def probabilities(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """(B, num_classes) softmax probabilities (B = 1 for a single image)."""
        images = _as_list(images)
        chunks = [self.model(self.preprocess(images[i:i + self.batch_size])).float().softmax(dim=1).cpu()
                  for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks)

    def __call__(self, images: ImageLike | Sequence[ImageLike], topk: int = 5) -> Any:
        """The ``topk`` classes of one image (a list of :class:`Prediction`), or of each of a list of images."""
        decoded = decode_predictions(self.probabilities(images), topk, self.class_names)
        return decoded if _is_many(images) else decoded[0]

    def explain(self, image: ImageLike, classes: str | int | Sequence[str | int] | None = None, *, topk: int = 1,
                methods: Sequence[str] = cam.DEFAULT_METHODS, layer: str | None = None) -> Explanation:
        """Class-activation maps of ``image`` for ``classes`` (names or indices), else its ``topk`` classes.

        ``methods``: among :data:`xception.inference.explain.METHODS` (default Grad-CAM and Grad-CAM++);
        ``layer``: a submodule name of the model (default: the last feature map, ``forward_features``'s output).
        """
        x = self.preprocess([image])
        with torch.no_grad():
            probs = self.model(x).float().softmax(dim=1)[0].cpu()
        if classes is None:
            targets = decode_predictions(probs[None], topk, self.class_names)[0]
        else:
            wanted = [classes] if isinstance(classes, (str, int)) else list(classes)
            targets = [Prediction(self.class_names[i], probs[i].item(), i)
                       for i in (class_index(c, self.class_names) for c in wanted)]
        # gradients need floating point: an int8 model is explained through the fp32 weights it was made from
        float_model = getattr(self.model, "float_model", self.model)
        heatmaps = cam.class_activation_maps(float_model, x, [t.index for t in targets], methods=methods, layer=layer)
        return Explanation(cam.to_display(x[0], self.preprocessing), targets, heatmaps, layer or cam.FEATURES)


def _is_many(images: Any) -> bool:
    return isinstance(images, (list, tuple))


def _as_list(images: Any) -> list:
    return list(images) if _is_many(images) else [images]
