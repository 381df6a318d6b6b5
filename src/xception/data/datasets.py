"""The image collections the project reads: scikit-learn's digits and folders of class folders.

Each yields ``(image, target)``; a folder image that cannot be read comes as an
:class:`~.images.Unreadable` naming it (see :mod:`.images`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from .images import load_or_unreadable, open_image

DIGITS = "digits"


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 grayscale images) as PIL images.

    ``split``: ``"train"`` (80%), ``"val"`` (20%) or ``"all"``; the split is stratified and fixed.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", transform=None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val", "all"):
            raise ValueError(f"digits split must be 'train', 'val' or 'all', got {split!r}")
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..255
        targets = digits.target.astype(np.int64)
        if split != "all":
            train_idx, val_idx = train_test_split(
                np.arange(len(targets)), test_size=0.2, stratify=targets, random_state=0)
            keep = np.sort(train_idx if split == "train" else val_idx)
            images, targets = images[keep], targets[keep]
        self.images, self.targets = images, targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index], mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that reads with :func:`.images.open_image` and yields an :class:`.images.Unreadable`
    in place of an image it cannot read.

    ``classes`` fixes the class list (and indices), e.g. the training set's for the validation set.
    """

    def __init__(self, root: str | Path, transform=None, classes: Sequence[str] | None = None) -> None:
        self._fixed_classes = list(classes) if classes is not None else None
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        super().__init__(str(root), transform=transform, loader=open_image, allow_empty=True)
        counts = {c: 0 for c in self.classes}
        for _, target in self.samples:
            counts[self.classes[target]] += 1
        for c, n in counts.items():
            if n == 0 and (root / c).is_dir():  # (a validation set may lack a class folder)
                raise ValueError(f"class folder {root / c} has no images")
        if not self.samples:
            raise ValueError(f"no images found in {root}")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise ValueError(f"no class folders in {directory} (expected {directory}/<class>/<image>)")
        if self._fixed_classes is not None:
            unknown = sorted(set(found) - set(self._fixed_classes))
            if unknown:
                raise ValueError(f"class folder(s) {', '.join(unknown)} in {directory} are not training classes")
            found = self._fixed_classes
        return found, {c: i for i, c in enumerate(found)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        load = (lambda: self.transform(open_image(path))) if self.transform is not None else lambda: open_image(path)
        return load_or_unreadable(load, path), target


SPLITS = ("train", "val")


def folder_split(root: str | Path, split: str, transform=None, *, val_split: float | None = None,
                 classes: Sequence[str] | None = None) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) images of a folder, as a dataset with ``classes``
    and ``targets``: ``ROOT/<split>/<class>/*`` when ROOT has ``train/``; else, with ``val_split``,
    a fixed stratified part of ``ROOT/<class>/*`` (the same images on every call); else all of
    ``ROOT/<class>/*``. ``classes`` fixes the class list and its order (a model's, the training set's)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (give a folder of images or 'digits')")
    if (root / "train").is_dir():
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / 'train'} exists but {root / split} does not")
        return SafeImageFolder(root / split, transform, classes=classes)
    folder = SafeImageFolder(root, transform, classes=classes)
    if val_split is None:
        return folder
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1), got {val_split!r}")
    from sklearn.model_selection import train_test_split

    targets = list(folder.targets)
    idx = np.arange(len(targets))
    try:
        train_idx, val_idx = train_test_split(idx, test_size=val_split, stratify=targets, random_state=0)
    except ValueError:  # a class too small to stratify
        train_idx, val_idx = train_test_split(idx, test_size=val_split, random_state=0)
    part = Subset(folder, sorted((train_idx if split == "train" else val_idx).tolist()))
    part.targets = [targets[i] for i in part.indices]  # type: ignore[attr-defined]
    part.classes = folder.classes  # type: ignore[attr-defined]
    return part
