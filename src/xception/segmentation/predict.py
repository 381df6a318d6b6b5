"""Masks for images on disk, and the ONNX export of a DeepLabv3+ model.

    predict_masks   every image of files / folders / globs -> OUT/<stem>.png (palette mask, class
                    index per pixel) and OUT/<stem>_overlay.jpg (the mask's colours over the photo)
    export_onnx     ONNX with dynamic batch, height and width, checked against PyTorch at two sizes
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import UnreadableImage, expand_inputs, read_image
from ..data.segmentation import save_mask_png, voc_palette
from ..extras import require
from ..fileio import atomic_path, atomic_write
from .evaluate import segment_logits
from .model import DeepLabV3Plus

log = logging.getLogger(__name__)


def image_tensor(image: Image.Image, model: DeepLabV3Plus) -> torch.Tensor:
    """(1, 3, H, W) normalised by the model's preprocessing, at the image's own size."""
    pre = model.preprocessing
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


@dataclass
class MaskResult:
    path: Path
    mask: Path | None = None
    overlay: Path | None = None
    error: str | None = None
    class_pixels: dict[str, int] | None = None


def predict_masks(model: DeepLabV3Plus, inputs: Sequence[str], out: str | os.PathLike, *,
                  scales: Sequence[float] = (1.0,), flip: bool = False, overlay: bool = True,
                  device: torch.device | str = "cpu", alpha: float = 0.5) -> list[MaskResult]:
    """Segment every image ``inputs`` name; a bad input is reported in its result and skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    names = getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)]
    palette = voc_palette()
    results = []
    for path, error in expand_inputs(list(inputs)):
        if error is not None:
            results.append(MaskResult(path, error=error))
            continue
        try:
            image = read_image(path)
        except (UnreadableImage, OSError, ValueError) as e:
            results.append(MaskResult(path, error=str(e)))
            continue
        mask = segment_logits(model, image_tensor(image, model).to(device), scales, flip).argmax(1)[0].cpu()
        mask_path, overlay_path = out / f"{path.stem}.png", out / f"{path.stem}_overlay.jpg"
        save_mask_png(mask.to(torch.uint8), mask_path, palette)
        if overlay:
            colours = np.array(palette, dtype=np.uint8).reshape(256, 3)[mask.numpy()]
            blended = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colours
            picture = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
            atomic_write(overlay_path, lambda f, picture=picture: picture.save(f, format="JPEG", quality=90))
        counts = torch.bincount(mask.flatten(), minlength=model.num_classes)
        results.append(MaskResult(path, mask_path, overlay_path if overlay else None,
                                  class_pixels={names[i]: int(c) for i, c in enumerate(counts.tolist()) if c}))
    return results


@dataclass
class ExportReport:
    path: Path
    errors: dict[str, float]  # "HxW" -> relative L2 error of the ONNX logits vs PyTorch


def export_onnx(model: DeepLabV3Plus, out: str | os.PathLike, *, sizes: Sequence[tuple[int, int]] = ((97, 129), (160, 120)),
                check: bool = True) -> ExportReport:
    """Write ``model`` as ONNX (dynamic batch, height, width) atomically; with ``check`` run it with
    ONNX Runtime at each of ``sizes`` and compare with PyTorch."""
    model = model.cpu().eval()
    out = Path(out)
    example = torch.randn(1, 3, *sizes[0])
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(out, suffix=".onnx") as tmp:
        # The TorchScript-based exporter: the same graph as the Dynamo one here, exported in seconds
        # instead of most of a minute. The input checks' shape reads trace as constants: silence them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": axes, "logits": axes}, opset_version=17)
        errors = _check_onnx(model, tmp, sizes) if check else {}
    return ExportReport(out, errors)


def _check_onnx(model: DeepLabV3Plus, path: Path, sizes: Sequence[tuple[int, int]]) -> dict[str, float]:
    ort = require("onnxruntime", "onnx", "the ONNX parity check (or --no-check)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = {}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        if got.shape != ref.shape:
            raise ValueError(f"{path}: ONNX output {tuple(got.shape)} at {h}x{w}, PyTorch {tuple(ref.shape)}")
        errors[f"{h}x{w}"] = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    return errors
