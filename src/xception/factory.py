"""``create_model``: a registered model, with weights and as a backbone if asked."""

from __future__ import annotations

import os

from torch import nn

from .models.features import FeatureExtractor
from .models.registry import build_model
from .weights import load_pretrained


def create_model(name: str = "xception", *, pretrained: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: one of :func:`~xception.list_models`.
        pretrained: ``None`` (random init), ``"keras"`` / ``"keras_notop"`` / ``"timm"`` (download
            the public ImageNet weights, checksum-verified, into the torch hub cache), or a path to
            a Keras ``.h5``, a timm/Cadene ``.pth`` state dict, one of our ``.safetensors`` files or
            a training checkpoint. Options implied by the file (e.g. Keras's ``bn_eps``) are
            applied; other ``kwargs`` (e.g. ``num_classes``) override them.
        **kwargs: fields of the model's config, e.g. ``num_classes=10, drop_rate=0.5``; and
            ``features_only=True`` (with optional ``out_indices``) for a
            :class:`~xception.models.FeatureExtractor` returning the multi-scale feature maps.
    """
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices needs features_only=True, got out_indices={out_indices!r}")
    if pretrained is not None:
        model = load_pretrained(name, pretrained, **kwargs)
    else:
        model = build_model(name, **kwargs)
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model
