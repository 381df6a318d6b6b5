"""The model registry: a name -> builder dict, ``list_models`` and ``create_model``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(**kwargs) -> nn.Module`` under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(name: str = "xception", *, pretrained: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: one of :func:`list_models`.
        pretrained: ``None`` (random init), ``"keras"`` / ``"timm"`` (download the public ImageNet
            weights, checksum-verified, into the torch hub cache), or a path to a Keras ``.h5``,
            a timm/Cadene ``.pth`` state dict, one of our ``.safetensors`` files or a training
            checkpoint. Options implied by the file (e.g. Keras's ``bn_eps``) are applied; other
            ``kwargs`` (e.g. ``num_classes``) override them.
        **kwargs: fields of the model's config, e.g. ``num_classes=10, drop_rate=0.5``; and
            ``features_only=True`` (with optional ``out_indices``) for a
            :class:`~xception.features.FeatureExtractor` returning the multi-scale feature maps.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices needs features_only=True, got out_indices={out_indices!r}")
    if pretrained is not None:
        from .weights import load_pretrained

        model = load_pretrained(name, pretrained, **kwargs)
    else:
        model = _MODELS[name](**kwargs)
    model.model_name = name
    if features_only:
        from .features import FeatureExtractor

        return FeatureExtractor(model, out_indices)
    return model
