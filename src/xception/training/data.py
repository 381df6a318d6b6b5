"""Datasets and Inception-style transforms.

``DATA`` is either ``"digits"`` (scikit-learn's 8x8 handwritten digits, a fixed stratified 80/20
train/val split) or a folder of images: ``DATA/train/<class>/*`` + ``DATA/val/<class>/*``, or one
level of class folders with ``val_split`` holding out a stratified fraction.

Images are transformed as a :class:`~xception.preprocessing.Preprocessing` says: its eval
transform for validation, its Inception-style random-resized crop (+ optional flip) for training.

Every sample is transformed under its own seed, derived from (seed, epoch, index) by
:class:`EpochSampler`, so the augmentation of a sample does not depend on the loader's workers
or on where an interrupted epoch was resumed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..preprocessing import Preprocessing

log = logging.getLogger(__name__)

DIGITS = "digits"
T = TypeVar("T")


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
    """``ImageFolder`` that reports unreadable images by path and yields ``None`` for them.

    ``classes`` fixes the class list (and indices), e.g. the training set's for the validation set.
    """

    def __init__(self, root: str | Path, transform=None, classes: Sequence[str] | None = None) -> None:
        self._fixed_classes = list(classes) if classes is not None else None
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        super().__init__(str(root), transform=transform, allow_empty=True)
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
        try:
            img = self.loader(path)
            if self.transform is not None:
                img = self.transform(img)
        except Exception as e:  # any decoder failure: report the file, keep going
            log.warning("skipping unreadable image %s: %s", path, e)
            return None, target
        return img, target


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: list[str]


def _targets(dataset: Dataset) -> list[int]:
    return list(dataset.targets)


def build_datasets(data: str | Path, preprocessing: Preprocessing | None = None, *,
                   train_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                   val_split: float | None = None) -> DataSplits:
    """The train and validation datasets for ``data`` (``"digits"`` or a folder), transformed."""
    preprocessing = preprocessing or Preprocessing()
    train_tf = preprocessing.train_transform(scale=train_scale, hflip=hflip)
    val_tf = preprocessing.eval_transform()
    if str(data) == DIGITS:
        return DataSplits(DigitsDataset("train", train_tf), DigitsDataset("val", val_tf), DigitsDataset.classes)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (give a folder of images or 'digits')")
    if (root / "train").is_dir():
        train = SafeImageFolder(root / "train", train_tf)
        if not (root / "val").is_dir():
            raise FileNotFoundError(f"{root / 'train'} exists but {root / 'val'} does not")
        val = SafeImageFolder(root / "val", val_tf, classes=train.classes)
        return DataSplits(train, val, train.classes)
    if val_split is None:
        raise ValueError(f"{root} has no train/ and val/ folders: give --val-split F to hold out a fraction")
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1), got {val_split!r}")
    from sklearn.model_selection import train_test_split

    train_all = SafeImageFolder(root, train_tf)
    val_all = SafeImageFolder(root, val_tf, classes=train_all.classes)
    targets = _targets(train_all)
    idx = np.arange(len(targets))
    try:
        train_idx, val_idx = train_test_split(idx, test_size=val_split, stratify=targets, random_state=0)
    except ValueError:  # a class too small to stratify
        train_idx, val_idx = train_test_split(idx, test_size=val_split, random_state=0)
    train, val = Subset(train_all, sorted(train_idx.tolist())), Subset(val_all, sorted(val_idx.tolist()))
    train.targets = [targets[i] for i in train.indices]  # type: ignore[attr-defined]
    val.targets = [targets[i] for i in val.indices]  # type: ignore[attr-defined]
    return DataSplits(train, val, train_all.classes)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (SplitMix-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


class EpochSampler(Sampler):
    """Shards and shuffles like ``DistributedSampler``, yields ``(index, sample_seed)``.

    ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` samples of the epoch: that is how
    an epoch interrupted after ``k`` samples resumes exactly where it stopped.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=False)
        self.seed = seed
        self.epoch = 0
        self.start = 0

    @property
    def epoch_length(self) -> int:
        """This rank's samples in a whole epoch."""
        return len(self.inner)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(self.inner):
            if i >= self.start:
                yield index, sample_seed(self.seed, self.epoch, index)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (for evaluation)."""

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, None]]:
        return iter([(i, None) for i in self.indices])


class IndexedDataset(Dataset):
    """Wraps a dataset to take ``(index, seed)`` keys and return ``(image, target, index)``.

    With a seed the transform runs under ``torch.manual_seed(seed)`` in a forked RNG, leaving the
    caller's random state untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Any, int, int]:
        index, seed = key
        img, target = seeded(seed, lambda: self.dataset[index])
        return img, target, index


def seeded(seed: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` under ``torch.manual_seed(seed)`` in a forked RNG (the caller's state is left as it
    was); without a seed, a plain call."""
    if seed is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def collate_skip(batch: list[tuple[Any, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; return ``(images, targets, indices, n_skipped)``."""
    good = [b for b in batch if b[0] is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, indices, skipped


# --- inputs for prediction: files, folders or globs ------------------------------------------


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (searched recursively) and glob patterns, in given order."""
    import glob

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMG_EXTENSIONS)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match {item!r}")
            paths += matches
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return paths


class ImagePaths(Dataset):
    """Images by path for prediction: ``(tensor | None, index, error message | None)``."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, str | None]:
        try:
            with Image.open(self.paths[index]) as img:
                img.load()
                return self.transform(img), index, None
        except Exception as e:
            return None, index, f"{type(e).__name__}: {e}"


def collate_paths(batch: list[tuple[Any, int, str | None]]) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, [b[1] for b in good], [(b[1], b[2]) for b in batch if b[0] is None]
