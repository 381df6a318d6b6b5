"""Keras Xception ``.h5`` weights (legacy HDF5 layout, Keras 2 or 3) in the seed's layout.

    conv1.weight  <- Keras block1_conv1/kernel (kh, kw, in, out), transposed to (out, in, kh, kw)
    block1.skip   <- Keras conv2d / batch_normalization: the four unnamed residual layers, by order
    fc.weight     <- Keras predictions/kernel (2048, 1000), transposed
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# What a Keras Xception file implies about the model beyond its tensors: TensorFlow's batch-norm
# epsilon and 'same' max-pool padding.
KERAS_CONFIG = {"bn_eps": 1e-3, "pool_padding": "same"}

_KERAS_BLOCK = re.compile(r"block(\d+)_(conv|sepconv)(\d+)(_bn)?$")
_KERAS_UNNAMED = re.compile(r"(conv2d|batch_normalization)(_\d+)?$")
_SKIP_BLOCKS = ("block1", "block2", "block3", "block12")  # seed blocks with a 1x1 residual conv


def _attr_strings(group, name: str) -> list[str]:
    """An HDF5 string-list attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _keras_layer_target(layer: str) -> str | None:
    """Our module name for a named Keras Xception layer (None: not one of them)."""
    m = _KERAS_BLOCK.match(layer)
    if not m:
        return {"predictions": "fc"}.get(layer)
    block, kind, j, bn = int(m[1]), m[2], int(m[3]), bool(m[4])
    if block == 1 and kind == "conv" and j in (1, 2):
        return f"bn{j}" if bn else f"conv{j}"
    if block == 14 and kind == "sepconv" and j in (1, 2):
        return f"bn{j + 2}" if bn else f"conv{j + 2}"
    if 2 <= block <= 13 and kind == "sepconv":
        # Our Block.rep: [ReLU], SeparableConv2d, BatchNorm2d, ReLU, SeparableConv2d, BatchNorm2d, ...
        # Keras block 2 (our block1) has no leading ReLU.
        index = 3 * (j - 1) + (0 if block == 2 else 1)
        return f"block{block - 1}.rep.{index + int(bn)}"
    return None


def _keras_tensor(leaf: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Our parameter name and layout for one Keras weight (``leaf`` = ``kernel``, ``gamma``, ...)."""
    if leaf == "depthwise_kernel":  # (kh, kw, in, 1) -> (in, 1, kh, kw)
        return "conv1.weight", value.permute(2, 3, 0, 1)
    if leaf == "pointwise_kernel":  # (1, 1, in, out) -> (out, in, 1, 1)
        return "pointwise.weight", value.permute(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return "weight", value.permute(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:  # Dense (in, out) -> (out, in)
        return "weight", value.t()
    names = {"bias": "bias", "gamma": "weight", "beta": "bias",
             "moving_mean": "running_mean", "moving_variance": "running_var"}
    if leaf not in names:
        raise KeyError(leaf)
    return names[leaf], value


def read_keras_h5(path: Path) -> dict[str, torch.Tensor]:
    """A Keras Xception weights file (its whole model or only its weights) as a state dict in the
    seed's layout; ValueError naming the file if it is not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
            if "layer_names" not in group.attrs and "layer_names0" not in group.attrs:
                if "layers" in f and "vars" in f:  # Keras 3 .weights.h5: layers named by class, not by role
                    raise ValueError(f"{path}: Keras 3 native weights format is not supported; in Keras, "
                                     f"model.save('model.h5') writes the legacy HDF5 layout that loads here")
                raise ValueError(f"{path}: HDF5 file without Keras 'layer_names': not a Keras weights file")
            layers = _attr_strings(group, "layer_names")
            state: dict[str, torch.Tensor] = {}
            unnamed = {"conv2d": 0, "batch_normalization": 0}
            unknown = []
            for layer in layers:
                weight_names = _attr_strings(group[layer], "weight_names")
                if not weight_names:
                    continue  # activations, pooling, add, input
                target = _keras_layer_target(layer)
                m = _KERAS_UNNAMED.match(layer)
                if target is None and m:
                    i = unnamed[m[1]]
                    unnamed[m[1]] += 1
                    if i < len(_SKIP_BLOCKS):
                        target = f"{_SKIP_BLOCKS[i]}.{'skip' if m[1] == 'conv2d' else 'skipbn'}"
                if target is None:
                    unknown.append(layer)
                    continue
                for name in weight_names:
                    leaf = name.rsplit("/", 1)[-1].split(":")[0]
                    value = torch.from_numpy(group[layer][name][()].copy())
                    try:
                        suffix, value = _keras_tensor(leaf, value)
                    except KeyError:
                        unknown.append(f"{layer}/{leaf}")
                        continue
                    state[f"{target}.{suffix}"] = value.contiguous()
    except OSError as e:
        raise ValueError(f"{path}: unreadable HDF5 file (truncated or corrupt?): {e}") from None
    except KeyError as e:
        raise ValueError(f"{path}: broken Keras weights file: missing {e}") from None
    if unknown:
        raise ValueError(f"{path}: not a Keras Xception weights file: {len(unknown)} layer weights it does not "
                         f"have, e.g. {', '.join(unknown[:5])}")
    return state
