"""Loading weights into models and saving them: ``load_pretrained``, ``load_weights``,
``save_safetensors``.

:func:`load_pretrained` builds the model a weight file implies (explicit options win) and loads
it; :func:`load_weights` loads into a model you already have. Both attach what the file says
about its use: ``model.class_names`` and ``model.preprocessing``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from torch import nn

from ..fileio import atomic_path
from ..models.registry import build_model, list_models
from ..preprocessing import Preprocessing
from .imagenet import IMAGENET_NUM_CLASSES, imagenet_classes
from .matching import adapt, copy_into, implied_config, match_state_dict, unwrap
from .readers import INT8_PREFIX, SAFETENSORS_FORMAT, WeightFile, read_weights
from .sources import REMOTE_WEIGHTS, TIMM_PREPROCESSING, download_weights

log = logging.getLogger(__name__)


def resolve_source(source: str | os.PathLike) -> Path:
    """A named public source (``"keras"``, ``"timm"``, ...) downloaded and verified, or a path."""
    if isinstance(source, str) and source in REMOTE_WEIGHTS:
        return download_weights(source)
    if not Path(source).exists():
        raise FileNotFoundError(f"weights not found: {source} (neither a file nor a named source: "
                                f"{', '.join(REMOTE_WEIGHTS)})")
    return Path(source)


def weights_preprocessing(weights: WeightFile, name: str) -> Preprocessing:
    """What the file records or its source implies; foreign files in timm's layout get timm's."""
    if weights.preprocessing is not None:
        return weights.preprocessing
    if weights.foreign and name in TIMM_PREPROCESSING:
        return TIMM_PREPROCESSING[name]
    return Preprocessing()


def weights_class_names(weights: WeightFile, model: nn.Module) -> list[str] | None:
    """The class names the file records; ImageNet's for a 1000-class Keras or foreign (timm) file without any."""
    if weights.class_names is not None:
        return weights.class_names
    if getattr(model, "num_classes", None) == IMAGENET_NUM_CLASSES and (weights.kind == "keras" or weights.foreign):
        return imagenet_classes()
    return None


def load_pretrained(name: str | None, source: str | os.PathLike | WeightFile, **kwargs) -> nn.Module:
    """Build the model a weight file implies and load it (``create_model(name, pretrained=source)``).

    Args:
        name: registered model name; ``None`` takes the one the file records (else ``"xception"``).
        source: ``"keras"``, ``"keras_notop"``, ``"timm"`` (downloaded, verified, cached) or a path to a
            Keras ``.h5``, a timm/Cadene ``.pth``, our ``.safetensors`` or our training checkpoint
            (or such a file already read by :func:`~xception.weights.read_weights`).
        **kwargs: config options; they override what the file implies. A ``num_classes`` other than
            the file's loads everything but the classifier, which stays freshly initialised.

    The model comes back in training mode, as ``create_model`` builds it; call ``.eval()`` to infer.
    A file ``xception quantize`` wrote gives the fp32 model with its calibration attached as
    ``model.int8_calibration`` (see :func:`xception.deploy.int8.int8_model`).
    Its ``class_names`` attribute holds the file's class names (ImageNet's for a 1000-class Keras or
    timm-layout file; None if it records none), its ``preprocessing`` the
    :class:`~xception.Preprocessing` its inputs need.
    """
    weights = source if isinstance(source, WeightFile) else read_weights(resolve_source(source))
    if weights.model_name and name and weights.model_name != name:
        raise ValueError(f"{weights.path}: holds a {weights.model_name!r} model, not {name!r}")
    name = name or weights.model_name or "xception"
    implied = weights.config if not weights.foreign else implied_config(weights)
    config = {**implied, **kwargs}
    try:
        model = build_model(name, **config)
    except TypeError as e:  # an option this version's config does not have
        raise ValueError(f"{weights.path}: cannot build {name!r} with the file's options {config}: {e}") from None
    # Only an explicit num_classes may leave the file's classifier out (fine-tuning to other classes).
    state, with_head = match_state_dict(adapt(weights, model), model, weights.path,
                                        strict_classifier="num_classes" not in kwargs)
    copy_into(model, state)
    model.class_names = weights_class_names(weights, model) if with_head else None
    model.preprocessing = weights_preprocessing(weights, name)
    if weights.int8 is not None and with_head and not kwargs:
        # a static int8 calibration of exactly these weights: the inference commands run it on a CPU
        model.int8_calibration = {**weights.int8, "path": str(weights.path)}
    log.info("loaded %s weights from %s into %s", weights.kind, weights.path, name)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weight file of any supported kind into an existing ``model`` (in place; returns it).

    ``strict=False`` only relaxes the classifier: one of another class count is left as it is.
    Every other mismatch (missing, unexpected or mis-shaped tensors) is a ValueError either way.
    """
    wrapper, model = model, unwrap(model)
    weights = read_weights(resolve_source(path))
    if weights.model_name and getattr(model, "model_name", weights.model_name) != weights.model_name:
        raise ValueError(f"{weights.path}: holds a {weights.model_name!r} model, not {model.model_name!r}")
    config = getattr(model, "config", None)
    if weights.kind == "keras" and config is not None:
        differ = {k: v for k, v in weights.config.items() if k != "num_classes" and getattr(config, k, v) != v}
        if differ:
            log.warning("%s: Keras weights expect %s; this model has %s: outputs will differ from Keras",
                        weights.path, differ, {k: getattr(config, k) for k in differ})
    state, with_head = match_state_dict(adapt(weights, model), model, weights.path, strict_classifier=strict)
    copy_into(model, state)
    names = weights_class_names(weights, model) if with_head else None
    if names is not None:
        model.class_names = names
    model.preprocessing = weights_preprocessing(weights, getattr(model, "model_name", ""))
    return wrapper


def save_safetensors(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None, *,
                     preprocessing: Preprocessing | None = None, int8: dict | None = None) -> Path:
    """Write ``model``'s weights and what rebuilds and feeds it (name, config, class names,
    preprocessing) to ``path``, atomically. ``class_names`` and ``preprocessing`` default to the
    model's own attributes (set by the loaders), then to none and ``Preprocessing()``. ``int8``:
    a static int8 calibration (``{"state": tensors, "info": dict}``) stored beside the weights."""
    from safetensors.torch import save_file

    path = Path(path)
    model = unwrap(model)
    model_name = getattr(model, "model_name", None) or type(model).__name__.lower()
    if model_name not in list_models():
        raise ValueError(f"cannot record the model: {model_name!r} is not a registered model name")
    config = getattr(model, "config", None)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    if class_names is not None and config is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {config.num_classes}-class model")
    preprocessing = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "model_name": model_name,
        "config": json.dumps(dataclasses.asdict(config) if config is not None else {}),
        "class_names": json.dumps(list(class_names) if class_names is not None else None),
        "preprocessing": json.dumps(preprocessing.to_dict()),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if int8 is not None:
        metadata["int8"] = json.dumps(int8["info"])
        tensors.update({INT8_PREFIX + k: v.detach().cpu().contiguous() for k, v in int8["state"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("wrote %s (%s, %d tensors)", path, model_name, len(tensors))
    return path
