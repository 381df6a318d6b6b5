"""How images become model inputs: one :class:`Preprocessing` object, stored with the weights.

Evaluation resizes the short side to ``image_size / crop_pct`` and centre-crops ``image_size``;
training takes an Inception-style random-resized crop and an optional horizontal flip. Every
image is converted to RGB (grayscale works as is), scaled to [0, 1] and normalised with
``mean`` / ``std`` (0.5 / 0.5 = inputs in [-1, 1], what the Keras and timm Xception weights expect).

``Preprocessing()`` is the one default (299 px, crop 0.875, bicubic, [-1, 1]). Weight sources
carry their own (:mod:`xception.weights.sources`); our ``.safetensors`` files and training
checkpoints record the one they were made with, and every command reads it from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torchvision import transforms as T

INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """Image size, crop fraction, interpolation, mean and std of a model's inputs.

    Args:
        image_size: side of the square input.
        crop_pct: evaluation resizes the short side to ``image_size / crop_pct``, then centre-crops.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        mean, std: per-channel normalisation of [0, 1] RGB values.
    """

    image_size: int = 299
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {self.image_size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std) or not self.mean or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std must be equally long with std > 0, got {self.mean!r}, {self.std!r}")

    def replace(self, **changes: Any) -> "Preprocessing":
        """A copy with ``changes``; ``None`` values are ignored (convenient for optional flags)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """Build from recorded values (checkpoint or file metadata); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing option(s): {', '.join(unknown)}")
        return cls(**values)

    def eval_transform(self) -> T.Compose:
        """Resize the short side to ``image_size / crop_pct``, centre-crop ``image_size``, normalise."""
        return T.Compose([
            T.Lambda(_to_rgb),
            T.Resize(int(round(self.image_size / self.crop_pct)), interpolation=INTERPOLATIONS[self.interpolation]),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def train_transform(self, *, scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> T.Compose:
        """Random-resized crop of ``image_size`` (area fraction in ``scale``), optional flip, normalise."""
        steps: list[Any] = [
            T.Lambda(_to_rgb),
            T.RandomResizedCrop(self.image_size, scale=scale, interpolation=INTERPOLATIONS[self.interpolation]),
        ]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)
