"""The model registry: a name -> builder dict, ``register_model``, ``list_models``, ``build_model``.

``build_model`` only builds (random initialisation). :func:`xception.create_model` adds weights
(``pretrained=``) and the backbone view (``features_only=``) on top of it.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(**kwargs) -> nn.Module`` under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`build_model` and :func:`xception.create_model`."""
    return sorted(_MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """A freshly initialised registered model; ``kwargs`` are fields of its config."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    model.model_name = name
    return model
