"""``xception summary``: the layer table of a model, like Keras's ``model.summary()`` (via torchinfo).

One row per module with its output shape and parameter count, then the totals; the shapes come
from one forward pass of a (1, 3, S, S) input (``pip install "xception[summary]"``).
"""

from __future__ import annotations

import os

import torch

from ..extras import require
from ..factory import create_model
from ..preprocessing import Preprocessing
from ..weights import load_pretrained


def model_summary(model_name: str | None = None, *, image_size: int | None = None,
                  weights: str | os.PathLike | None = None, depth: int = 4, **model_kwargs) -> str:
    """The layer table of ``model_name`` (or of the model ``weights`` imply) at ``image_size``
    (default: the weights' preprocessing, else 299), ``depth`` levels of nested modules deep."""
    torchinfo = require("torchinfo", "summary", "xception summary")
    if weights is not None:
        model = load_pretrained(model_name, weights, **model_kwargs)
    else:
        model = create_model(model_name or "xception", **model_kwargs)
    size = image_size or getattr(model, "preprocessing", Preprocessing()).image_size
    if size < 1 or depth < 1:
        raise ValueError(f"image size and depth must be >= 1, got {size} and {depth}")
    stats = torchinfo.summary(model.eval(), input_size=(1, model.in_chans, size, size), depth=depth, verbose=0,
                              col_names=("output_size", "num_params"), row_settings=("var_names",),
                              device=torch.device("cpu"))
    return f"{model.model_name} at {size}x{size}\n{stats}"
