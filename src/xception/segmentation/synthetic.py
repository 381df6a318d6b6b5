"""A synthetic segmentation set of shapes, for tests, benchmarks and a first run without data.

``make_shapes(root, train=..., val=...)`` writes the plain layout (``root/{train,val}/images/*.png``,
``root/{train,val}/masks/*.png``, ``root/classes.txt``): on a noisy background (class 0), discs
(class 1) and squares (class 2), each of its own colour family, of random size, place and count.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SHAPE_CLASSES = ("background", "disc", "square")


def make_shapes(root: str | os.PathLike, *, train: int = 32, val: int = 8, size: int = 64, seed: int = 0,
                radius: tuple[float, float] = (0.1, 0.25)) -> Path:
    """Write the set under ``root``; returns ``root``. The same arguments give the same files.

    ``radius``: the range of a shape's radius (half the side of a square's bounding box, before
    its 0.85 factor), as fractions of ``size``.
    """
    low, high = radius
    if not 0 < low <= high < 0.5:
        raise ValueError(f"radius must be 0 < min <= max < 0.5 (fractions of the size), got {radius!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = _sample(rng, size, radius)
            Image.fromarray(image).save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:05d}.png")
    (root / "classes.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")
    return root


def _sample(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    image = (rng.normal(110, 25, (size, size, 3))).clip(0, 255)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.integers(1, 3))
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(r, size - r, 2)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if kind == 1 else \
            ((np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85))
        base = np.array([200, 60, 50]) if kind == 1 else np.array([50, 80, 200])
        image[inside] = (base + rng.normal(0, 20, 3)).clip(0, 255)
        mask[inside] = kind
    return image.astype(np.uint8), mask
