"""Reading images: the one decoder every path uses, the glob expander, and the collate that skips
what could not be read.

:func:`open_image` turns a file or its bytes into an upright RGB image: the EXIF orientation a
phone records is applied (a portrait shot reaches the model upright), 16-bit images are scaled to
8 bits rather than clipped, and Pillow's decompression-bomb limit stays in force. What cannot be
read is an :class:`UnreadableImage` naming the file.

Datasets return an :class:`Unreadable` in place of an image they could not read, so one bad file
costs one sample: :func:`collate_skip` stacks the rest and hands the failures on, and each caller
decides what to do with them (training and evaluation log them, prediction reports a row each).
"""

from __future__ import annotations

import glob
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # single-channel modes deeper than 8 bits


class UnreadableImage(ValueError):
    """An input that is missing, not an image, truncated, or too large to decode safely."""


def open_image(source: str | os.PathLike | bytes, name: str | None = None, *,
               max_pixels: int | None = None) -> Image.Image:
    """The image in ``source`` (a path or the file's bytes) as an upright RGB PIL image.

    ``name`` is what errors call it (default: the path). ``max_pixels``: a lower limit than
    Pillow's (for untrusted uploads), checked from the header before anything is decoded.
    Raises :class:`UnreadableImage`.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise UnreadableImage(f"{name}: refused, {img.width}x{img.height} pixels is over the limit of "
                                      f"{max_pixels:,}")
            upright = ImageOps.exif_transpose(img)  # a copy, turned as the camera recorded
            return _to_rgb(upright)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{name}: refused, too many pixels to decode safely ({e})") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, bad CRC, ...
        raise UnreadableImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_MODES:  # PIL's own conversion clips 16-bit values at 255 (a white image)
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def read_image(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a path, a PIL image or an (H, W[, 3|4]) uint8 array.

    A missing path is a ``FileNotFoundError``, a bad file an :class:`UnreadableImage` (a
    ``ValueError``), each naming the file.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    return open_image(path)


# --- what a sample looks like when its image could not be read ------------------------------------


@dataclass(frozen=True)
class Unreadable:
    """Stands in a sample for an image that could not be read: which one, and why."""

    name: str
    reason: str


def load_or_unreadable(load, name: str) -> Any:
    """``load()``, or an :class:`Unreadable` naming ``name`` when it raises (decoding or transforming)."""
    try:
        return load()
    except Exception as e:  # any decoder or transform failure: this sample only
        reason = str(e).removeprefix(f"{name}: ") if isinstance(e, UnreadableImage) else f"{type(e).__name__}: {e}"
        return Unreadable(name, reason)


class Batch(NamedTuple):
    """The readable samples of a batch, stacked, and the ones that were not."""

    images: torch.Tensor  # (B, C, H, W); (0,) when none was readable
    targets: torch.Tensor  # (B,) long; (B, H, W) masks for segmentation
    indices: torch.Tensor  # (B,) long: each sample's index in its dataset
    unreadable: list[tuple[int, Unreadable]]  # (index, why) of each sample left out


def collate_skip(samples: list[tuple[Any, int, int]]) -> Batch:
    """Stack ``(image | Unreadable, target, index)`` samples into a :class:`Batch`."""
    good = [s for s in samples if not isinstance(s[0], Unreadable)]
    bad = [(s[2], s[0]) for s in samples if isinstance(s[0], Unreadable)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    targets = [s[1] for s in good]  # class indices, or masks (segmentation)
    return Batch(torch.stack([s[0] for s in good]),
                 torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets, dtype=torch.long),
                 torch.tensor([s[2] for s in good], dtype=torch.long), bad)


def warn_unreadable(batch: Batch) -> int:
    """Log each image of ``batch`` that was skipped, by name; return how many."""
    for _, bad in batch.unreadable:
        log.warning("skipping unreadable image %s: %s", bad.name, bad.reason)
    return len(batch.unreadable)


# --- inputs for prediction: files, folders or globs -----------------------------------------------


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def expand_inputs(inputs: Sequence[str]) -> list[tuple[Path, str | None]]:
    """``(path, None)`` for every image the files, folders (searched recursively) and glob patterns
    of ``inputs`` name, in order, and ``(input, error)`` for each input that names none (missing, a
    pattern matching nothing, a folder without images): one bad input never stops the others."""
    entries: list[tuple[Path, str | None]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image_file(q))
            error = None if found else "no images in this folder"
        elif p.exists():
            found, error = [p], None
        elif glob.has_magic(item):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            error = None if found else "no files match this pattern"
        else:
            found, error = [], "no such file or folder"
        entries += [(q, None) for q in found] or [(p, error)]
    return entries


class ImagePaths(Dataset):
    """Images by path, for prediction: ``(tensor | Unreadable, -1, index)``."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path = self.paths[index]
        return load_or_unreadable(lambda: self.transform(open_image(path)), str(path)), -1, index
