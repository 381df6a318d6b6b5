"""The ImageNet-1k class names, in the standard order (index 207 = "golden retriever").

Taken from torchvision's weights metadata (the same 1000 categories every torchvision ImageNet
model carries; duplicates such as the two "crane"s are already told apart there), not copied by
hand. Every 1000-class file that records no names of its own (Keras with top, timm/Cadene) gets them.
"""

from __future__ import annotations

from functools import lru_cache

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _categories() -> tuple[str, ...]:
    from torchvision.models import get_weight

    names = tuple(get_weight("ResNet50_Weights.IMAGENET1K_V1").meta["categories"])
    if len(names) != IMAGENET_NUM_CLASSES:  # a torchvision that changed its metadata: say so, never guess
        raise RuntimeError(f"torchvision lists {len(names)} ImageNet categories, expected {IMAGENET_NUM_CLASSES}")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (a fresh list)."""
    return list(_categories())
