"""Tiny synthetic image folders for the training tests (colour decides the class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 20, seed: int = 0) -> Path:
    """``counts[split][class]`` images per class; each class has its own dominant colour channel."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for c, (name, n) in enumerate(per_class.items()):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., c % 3] += 150
                Image.fromarray(a).save(folder / f"{name}{i}.png")
    return root
