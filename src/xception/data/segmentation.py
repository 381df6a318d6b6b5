"""Semantic segmentation data: image/mask pairs, DeepLabv3+'s training augmentation applied to both,
and the collate that pads pairs of different sizes into one batch.

Two layouts (``layout="auto"`` tells them apart):

    voc     ROOT/JPEGImages/<stem>.jpg, ROOT/SegmentationClass/<stem>.png (palette PNGs whose pixel
            values are the class indices, 255 on object borders), ROOT/ImageSets/Segmentation/<split>.txt;
            ROOT may also be the folder holding VOC2012/ or VOCdevkit/VOC2012/
    plain   ROOT/<split>/images/<stem>.<any image type>, ROOT/<split>/masks/<stem>.png ("L" or "P",
            one class index per pixel), and optionally ROOT/classes.txt (one class name a line)

EXIF orientation: a mask is read as stored (a palette is never turned into colours, the mask's own
EXIF tag is ignored), in the grid of its image's *stored* pixels; the image's orientation then turns
both, so the image arrives upright as :func:`.images.open_image` gives it everywhere else and the mask
stays on it. A mask drawn on the upright view of a photo turned by 90 degrees fails the size check
with a hint rather than being silently misaligned (unless the photo is square, as with 180 degrees).

Seeding: the augmentation draws from the generator it is given, else from torch's global one, which
:class:`.sampling.IndexedDataset` seeds per sample with ``sample_seed(seed, epoch, index)``; so a sample's
scale, crop and flip do not depend on workers, and a resumed epoch repeats them exactly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..fileio import atomic_write
from ..preprocessing import Preprocessing
from .images import UnreadableImage, is_image_file, open_image

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
LAYOUTS = ("auto", "voc", "plain")
_MASK_MODES = ("L", "P", "I;16", "I")  # one index per pixel (16-bit for more than 256 classes)
_ORIENTATION = 0x0112
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn PIL.ImageOps.exif_transpose makes


class SegmentationDataset(Dataset):
    """The image/mask pairs of one split, in the VOC or the plain layout (see the module's docstring).

    Args:
        root: a VOC tree (or a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``), or a plain one.
        split: a split file's stem for VOC (``train``, ``val``, ``trainval``), a folder name for plain.
        layout: ``"voc"``, ``"plain"`` or ``"auto"``.
        transform: called as ``transform(image, mask)``; what it returns is the sample.
        num_classes: mask values must be below it or be ``ignore_index``; default: the number of
            ``class_names`` when known (VOC's 21, ``classes.txt``), else unchecked.
        ignore_index: the mask value of pixels that belong to no class (VOC's object borders).

    A sample is ``(image, mask)``: a ``tv_tensors.Image`` (3, H, W) uint8 upright RGB and a
    ``tv_tensors.Mask`` (H, W) int64, plain tensors to everything else, which a torchvision v2
    transform moves together. After :class:`SegmentationTrainTransform`: float32 (3, crop, crop) and
    int64 (crop, crop); after :class:`SegmentationEvalTransform`: float32 (3, H, W) and int64 (H, W).
    An unreadable image raises :class:`.images.UnreadableImage` naming it.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, layout: str = "auto", transform=None,
                 num_classes: int | None = None, ignore_index: int = 255) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"segmentation data folder not found: {root}")
        voc = _voc_root(root)
        if layout == "auto":
            if voc is None and not (root / split / "images").is_dir():
                raise ValueError(f"{root}: neither a VOC tree (JPEGImages/, SegmentationClass/) nor a plain one "
                                 f"({split}/images/, {split}/masks/)")
            layout = "voc" if voc is not None else "plain"
        if layout == "voc":
            if voc is None:
                raise FileNotFoundError(f"{root}: no JPEGImages/ and SegmentationClass/ here, in VOC2012/ or "
                                        f"in VOCdevkit/VOC2012/")
            self.samples, self.class_names = _voc_samples(voc, split), list(VOC_CLASSES)
        else:
            self.samples, self.class_names = _plain_samples(root, split), _read_class_names(root / "classes.txt")
        if num_classes is not None and self.class_names is not None and num_classes != len(self.class_names):
            raise ValueError(f"num_classes is {num_classes} but the dataset names {len(self.class_names)} classes")
        self.num_classes = num_classes if num_classes is not None or self.class_names is None else len(self.class_names)
        self.root, self.split, self.layout = root, split, layout
        self.transform, self.ignore_index = transform, ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Sample ``index`` before the transform, checked: sizes agree, every class index is known."""
        image_path, mask_path = self.samples[index]
        data = image_path.read_bytes()
        image = open_image(data, name=str(image_path))  # upright; UnreadableImage names the file
        orientation, stored = _stored_geometry(data)
        mask = _open_mask(mask_path)
        if mask.size != stored:
            hint = (" (its size once turned upright by its EXIF orientation: draw masks on the stored pixels)"
                    if mask.size == image.size else "")
            raise ValueError(f"{mask_path}: mask is {mask.width}x{mask.height} but image {image_path} is "
                             f"{stored[0]}x{stored[1]}{hint}")
        if orientation in _TURNS:
            mask = mask.transpose(_TURNS[orientation])
        values = np.asarray(mask).astype(np.int64)  # a "P" image's indices, never its colours
        if self.num_classes is not None:
            bad = (values >= self.num_classes) & (values != self.ignore_index)
            if bad.any():
                found = np.unique(values[bad]).tolist()
                raise ValueError(f"{mask_path}: class index {', '.join(map(str, found[:5]))} is not below "
                                 f"num_classes={self.num_classes} nor the ignore index {self.ignore_index}")
        return tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(values))


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


def _voc_samples(voc: Path, split: str) -> list[tuple[Path, Path]]:
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: no such split file (VOC has train, val and trainval)")
    samples = []
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.split():
            continue
        stem = line.split()[0]
        image = voc / "JPEGImages" / f"{stem}.jpg"
        if not image.is_file():
            raise FileNotFoundError(f"{split_file}:{number}: names {stem!r} but {image} does not exist")
        samples.append((image, voc / "SegmentationClass" / f"{stem}.png"))
    return _with_masks(samples, split_file, voc / "SegmentationClass")


def _plain_samples(root: Path, split: str) -> list[tuple[Path, Path]]:
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such folder (plain layout: ROOT/{split}/images/ and "
                                f"ROOT/{split}/masks/)")
    images = sorted(p for p in images_dir.iterdir() if is_image_file(p) and not p.name.startswith("."))
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):  # both would claim the same mask
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"{images_dir}: several images share a stem, so a mask name: {', '.join(twice[:3])}")
    return _with_masks([(p, masks_dir / f"{p.stem}.png") for p in images], images_dir, masks_dir)


def _with_masks(samples: list[tuple[Path, Path]], source: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    if not samples:
        raise ValueError(f"{source}: no samples (an empty split)")
    missing = [mask.name for _, mask in samples if not mask.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{masks_dir}: no mask for {len(missing)} of {len(samples)} images ({shown})")
    return samples


def _read_class_names(path: Path) -> list[str] | None:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def _stored_geometry(data: bytes) -> tuple[int, tuple[int, int]]:
    """An image file's EXIF orientation and the (width, height) of its pixels as stored."""
    with Image.open(io.BytesIO(data)) as img:  # the header only; open_image has decoded it already
        return img.getexif().get(_ORIENTATION, 1), img.size


def _open_mask(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            mask = img.copy()  # the palette indices as stored (a closed image can no longer be read)
    except Exception as e:  # missing, truncated, not an image, a decompression bomb
        raise UnreadableImage(f"{path}: not a readable mask ({type(e).__name__}: {e})") from None
    if mask.mode not in _MASK_MODES:
        raise ValueError(f"{path}: mask mode is {mask.mode}, expected one class index per pixel "
                         f"({', '.join(_MASK_MODES)}); map colour masks to indices first")
    return mask


# --- palette PNGs -----------------------------------------------------------------------------------


def voc_palette() -> list[int]:
    """VOC's 256-colour map, flat ``[r0, g0, b0, r1, ...]``: bits 0, 1, 2 of an index go to the top
    bit of red, green, blue, bits 3, 4, 5 to the next one down, and so on."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for shift in range(3):  # an 8-bit index holds three (r, g, b) bit triplets
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
        palette += rgb
    return palette


def save_mask_png(mask: torch.Tensor | np.ndarray, path: str | os.PathLike,
                  palette: Sequence[int] | None = None) -> None:
    """Write an (H, W) mask of class indices 0..255 as a palette PNG (default :func:`voc_palette`),
    atomically: a reader never sees half a file."""
    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if values.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(values.shape)}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"a palette PNG holds class indices 0..255, got {values.min()}..{values.max()}")
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), np.ascontiguousarray(values, np.uint8).tobytes())
    img.putpalette(list(palette) if palette is not None else voc_palette())
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# --- transforms and collate -------------------------------------------------------------------------


def _mean_std(preprocessing: Preprocessing | None, mean, std) -> tuple[list[float], list[float]]:
    if preprocessing is not None and (mean is not None or std is not None):
        raise ValueError("give preprocessing or mean/std, not both")
    pre = preprocessing or Preprocessing().replace(mean=mean, std=std)  # the model's [-1, 1] by default
    return list(pre.mean), list(pre.std)


def _normalised(image, mean: list[float], std: list[float]) -> torch.Tensor:
    return F.normalize(F.to_dtype(F.to_image(image), torch.float32, scale=True), mean, std)


def _as_mask(mask) -> tv_tensors.Mask:
    values = np.asarray(mask) if isinstance(mask, Image.Image) else mask  # a "P" image's indices, not colours
    return tv_tensors.Mask(torch.as_tensor(values, dtype=torch.int64))


class SegmentationTrainTransform:
    """DeepLabv3+'s training augmentation of an image and its mask, together.

    A random scale in ``scale_range`` (uniform; bilinear for the image, nearest for the mask), padding
    at the right and bottom up to ``crop_size`` (the image with 0 after normalisation, i.e. the mean
    colour as in DeepLab; the mask with ``ignore_index``, so padding is never learned), a random
    ``crop_size`` crop, a horizontal flip half the time (``flip``), normalisation by ``preprocessing``
    or ``mean``/``std`` (default: ``Preprocessing()``'s, inputs in [-1, 1]).

    ``transform(image, mask, generator=None)``: a PIL image or (3, H, W) uint8 tensor and its (H, W)
    class indices -> float32 (3, crop, crop) and int64 (crop, crop). Random numbers come from
    ``generator``, else from torch's global generator (seeded per sample by ``IndexedDataset``).
    """

    def __init__(self, crop_size: int | tuple[int, int] = 513, scale_range: tuple[float, float] = (0.5, 2.0), *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 preprocessing: Preprocessing | None = None, ignore_index: int = 255, flip: bool = True) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be a size >= 1 or (height, width), got {crop_size!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.scale_range, self.ignore_index, self.flip = tuple(scale_range), ignore_index, flip
        self.mean, self.std = _mean_std(preprocessing, mean, std)

    def __call__(self, image, mask, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # normalised first, so that the padding's 0 is exactly the mean colour
        image, mask = _normalised(image, self.mean, self.std), _as_mask(mask)  # (3, H, W), (H, W)
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image is {tuple(image.shape[-2:])} but mask is {tuple(mask.shape)}")
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand((), generator=generator).item()
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        image = F.resize(image, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        # nearest with pixel centres at +0.5, as the image's resize: the mask stays on its image (plain
        # "nearest" shifts it by up to a source pixel); class indices are never blended either way
        mask = F.resize(mask, size, interpolation=F.InterpolationMode.NEAREST_EXACT)
        crop_h, crop_w = self.crop_size
        padding = [0, 0, max(crop_w - size[1], 0), max(crop_h - size[0], 0)]  # left, top, right, bottom
        if any(padding):
            image, mask = F.pad(image, padding, fill=0.0), F.pad(mask, padding, fill=self.ignore_index)
        top = int(torch.randint(image.shape[-2] - crop_h + 1, (), generator=generator))
        left = int(torch.randint(image.shape[-1] - crop_w + 1, (), generator=generator))
        image, mask = F.crop(image, top, left, crop_h, crop_w), F.crop(mask, top, left, crop_h, crop_w)
        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class SegmentationEvalTransform:
    """Evaluation: the full image, normalised (no resize), and its mask as int64; batch with :func:`pad_collate`."""

    def __init__(self, preprocessing: Preprocessing | None = None, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.mean, self.std = _mean_std(preprocessing, mean, std)

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        return (_normalised(image, self.mean, self.std).as_subclass(torch.Tensor),
                _as_mask(mask).as_subclass(torch.Tensor))


def pad_collate(batch: Sequence[tuple], ignore_index: int = 255,
                size_divisor: int | None = None) -> tuple[torch.Tensor, ...]:
    """Stack ``(image, mask[, index])`` samples of different sizes, each padded at the right and bottom
    to the batch's largest height and width (rounded up to a multiple of ``size_divisor``, e.g. the
    network's output stride): images with 0 (the mean colour once normalised), masks with
    ``ignore_index``. Returns ``(images (B, C, H, W), masks (B, H, W)[, indices (B,)])``."""
    if not batch:
        raise ValueError("pad_collate got an empty batch")
    if size_divisor is not None and size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    height, width = max(s[0].shape[-2] for s in batch), max(s[0].shape[-1] for s in batch)
    if size_divisor:
        height, width = -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor
    first = batch[0][0]
    images = torch.zeros((len(batch), first.shape[0], height, width), dtype=first.dtype)
    masks = torch.full((len(batch), height, width), ignore_index, dtype=torch.int64)
    for i, (image, mask, *_) in enumerate(batch):
        images[i, :, :image.shape[-2], :image.shape[-1]] = image
        masks[i, :mask.shape[-2], :mask.shape[-1]] = mask
    if len(batch[0]) > 2:
        return images, masks, torch.tensor([s[2] for s in batch], dtype=torch.int64)
    return images, masks
