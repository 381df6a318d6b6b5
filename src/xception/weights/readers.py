"""Every supported weight file read into one form, a :class:`WeightFile`.

Keras ``.h5`` (see :mod:`.keras`), timm/Cadene ``.pth`` state dicts, our ``.safetensors`` and our
training checkpoints. Nothing is ever unpickled into code: ``torch.load(weights_only=True)``,
h5py and safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fileio import torch_load_safe
from ..preprocessing import Preprocessing
from .keras import KERAS_CONFIG, read_keras_h5
from .sources import KERAS_PREPROCESSING

log = logging.getLogger(__name__)

# The "format" of our training checkpoints (training/checkpoint.py writes them) and of the
# metadata of our .safetensors files.
CHECKPOINT_FORMAT = "xception-checkpoint"
SAFETENSORS_FORMAT = "xception"
# Tensors of a static int8 calibration in our .safetensors files (``xception quantize``).
INT8_PREFIX = "int8_calibration."
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class WeightFile:
    """What a weight file holds.

    Args:
        path: the file.
        kind: ``"keras"``, ``"state_dict"`` (timm/Cadene/foreign), ``"safetensors"`` or ``"checkpoint"``.
        state_dict: the tensors (Keras ones already in our layout).
        model_name: the registered model the file records, if it records one.
        config: config options the file implies (Keras: ``bn_eps``, ``pool_padding``, ``num_classes``).
        class_names: the class names the file records, if any.
        preprocessing: the preprocessing the file records or its source implies, if known.
        foreign: keys follow another implementation (timm/Cadene): prefixes, renames and reshapes apply.
        train_config: the settings of the training run (our checkpoints only; ``{}`` otherwise).
        int8: ``{"state": observer tensors, "info": how it was made}`` of a file ``xception quantize``
            wrote (static int8 calibration; the tensors in ``state_dict`` stay the fp32 weights).
    """

    path: Path
    kind: str
    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None
    foreign: bool = False
    train_config: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] | None = None


def read_weights(path: str | os.PathLike) -> WeightFile:
    """Read any supported weight file. Missing -> FileNotFoundError; unreadable -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path}: empty file, not a weights file")
    if head == _HDF5_SIGNATURE:
        state = read_keras_h5(path)
        num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        return WeightFile(path, "keras", state, model_name="xception", config={**KERAS_CONFIG, "num_classes": num_classes},
                          preprocessing=KERAS_PREPROCESSING)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path, head):
        return _read_safetensors(path)
    return _read_torch(path)


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    # A safetensors file starts with the little-endian length of a JSON header beginning with '{'.
    if len(head) < 8:
        return False
    size = int.from_bytes(head, "little")
    if not 0 < size < path.stat().st_size:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def check_checkpoint(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``obj`` as one of our training checkpoints, or a ValueError naming ``path`` and what is wrong."""
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an xception training checkpoint (no 'format': '{CHECKPOINT_FORMAT}')")
    for key in ("model_name", "config", "model"):
        if key not in obj:
            raise ValueError(f"{path}: xception checkpoint without {key!r}")
    if not isinstance(obj["model"], dict):
        raise ValueError(f"{path}: xception checkpoint whose 'model' is not a state dict")
    return obj


def recorded_preprocessing(values: Any, path: str | os.PathLike) -> Preprocessing | None:
    """The :class:`Preprocessing` a file records (None if it records none), or a ValueError naming it."""
    if values is None:
        return None
    try:
        return Preprocessing.from_dict(dict(values))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt preprocessing record: {e}") from None


def checkpoint_preprocessing(ckpt: dict[str, Any], path: str | os.PathLike) -> Preprocessing | None:
    """A checkpoint's preprocessing; older checkpoints only have the run's image size and crop."""
    if ckpt.get("preprocessing") is not None:
        return recorded_preprocessing(ckpt["preprocessing"], path)
    tc = ckpt.get("train_config") or {}
    if tc.get("image_size"):
        return Preprocessing().replace(image_size=int(tc["image_size"]), crop_pct=tc.get("crop_pct"))
    return None


def _read_torch(path: Path) -> WeightFile:
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    if obj.get("format") == CHECKPOINT_FORMAT:
        ckpt = check_checkpoint(obj, path)
        use_ema = isinstance(ckpt.get("ema"), dict)
        log.info("%s: using the %s weights of the checkpoint", path, "EMA" if use_ema else "model")
        return WeightFile(path, "checkpoint", _tensors_only(ckpt["ema"] if use_ema else ckpt["model"], path),
                          model_name=ckpt["model_name"], config=dict(ckpt["config"] or {}),
                          class_names=ckpt.get("class_names"), preprocessing=checkpoint_preprocessing(ckpt, path),
                          train_config=dict(ckpt.get("train_config") or {}))
    for key in ("state_dict", "model"):  # wrapped: {"state_dict": {...}, "epoch": ...}
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return WeightFile(path, "state_dict", _tensors_only(obj, path), foreign=True)


def _tensors_only(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict: {len(bad)} non-tensor entries, e.g. {bad[:3]}")
    return dict(obj)


def _read_safetensors(path: Path) -> WeightFile:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError on a truncated file
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        return WeightFile(path, "safetensors", state, foreign=True)
    try:
        config = json.loads(meta.get("config") or "{}")
        class_names = json.loads(meta.get("class_names") or "null")
        preprocessing = json.loads(meta.get("preprocessing") or "null")
        int8_info = json.loads(meta["int8"]) if "int8" in meta else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata: {e}") from None
    int8 = None
    if int8_info is not None:
        calibration = {k[len(INT8_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(INT8_PREFIX)]}
        if not isinstance(int8_info, dict) or not calibration:
            raise ValueError(f"{path}: int8 metadata without its calibration tensors")
        int8 = {"state": calibration, "info": int8_info}
    return WeightFile(path, "safetensors", state, model_name=meta.get("model_name"), config=config,
                      class_names=class_names, preprocessing=recorded_preprocessing(preprocessing, path), int8=int8)
