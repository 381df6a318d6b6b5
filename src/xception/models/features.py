"""Multi-scale feature extraction: the backbone view of every model in the registry.

Each model declares ``feature_info``: one dict per feature tap with ``num_chs`` (channels),
``reduction`` (input size / map size, capped by ``output_stride``) and ``module`` (where the tap
sits: a return node of torchvision's FX ``create_feature_extractor`` that yields that map). Its
``forward_intermediates(x, indices=...)`` returns those maps.
``create_model(name, features_only=True, out_indices=(...))`` wraps a model in a
:class:`FeatureExtractor` whose ``forward`` returns the list of maps, as timm does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """Resolve ``indices`` to sorted, non-negative tap indices and the largest of them.

    ``None`` takes every tap, an int ``n`` the last ``n`` taps, a sequence those taps (negative
    indices count from the end).
    """
    if indices is None:
        take = list(range(num_features))
    elif isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices as a count must be in 1..{num_features}, got {indices!r}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            if not isinstance(i, int) or not -num_features <= i < num_features:
                raise ValueError(f"feature index must be an integer in [{-num_features}, {num_features}), "
                                 f"got {i!r}")
            take.append(i % num_features)
        if not take:
            raise ValueError(f"indices must name at least one feature, got {indices!r}")
        if len(set(take)) != len(take):
            raise ValueError(f"feature indices must be distinct, got {indices!r}")
        take = sorted(take)
    return take, max(take)


class FeatureInfo(list):
    """The ``feature_info`` dicts of the selected taps, with timm's accessors."""

    def channels(self) -> list[int]:
        return [d["num_chs"] for d in self]

    def reduction(self) -> list[int]:
        return [d["reduction"] for d in self]

    def module_name(self) -> list[str]:
        return [d["module"] for d in self]


class FeatureExtractor(nn.Module):
    """A model that returns its feature maps: ``forward(x)`` -> list of (B, C_i, H_i, W_i).

    The wrapped model keeps its weights under ``.model`` (state-dict keys gain a ``model.``
    prefix); its classifier is removed, and the forward stops after the deepest requested tap.

    Args:
        model: a model with ``feature_info`` and ``forward_intermediates``.
        out_indices: which taps to return, in increasing order of depth (default: all).
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise ValueError(f"{type(model).__name__} does not provide feature maps")
        take, _ = feature_take_indices(len(model.feature_info), out_indices)
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.model = model
        self.out_indices = tuple(take)
        self.feature_info = FeatureInfo(dict(model.feature_info[i]) for i in take)
        self.model_name = getattr(model, "model_name", type(model).__name__)

    @property
    def config(self):
        """The wrapped model's config (``create_model(model_name, **asdict(config))`` builds the full model)."""
        return self.model.config

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                                intermediates_only=True)
