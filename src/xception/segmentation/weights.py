"""DeepLabv3+ weights: TensorFlow DeepLab checkpoints, our ``.safetensors``, training checkpoints,
and ImageNet encoders.

    read_deeplab_checkpoint    TensorFlow DeepLab's ``model.ckpt`` bundle -> our state dict, every
                               variable mapped (names and layouts), none left over
    save_deeplab / load_deeplab   ``.safetensors`` with the config, class names and preprocessing;
                               ``load_deeplab`` also reads TensorFlow checkpoints and our training
                               checkpoints
    load_encoder               ImageNet weights of the backbone (any file the classifiers load)

TensorFlow stores a conv kernel as (kh, kw, in, out), a depthwise kernel as (kh, kw, C, 1), and
batch norm as gamma / beta / moving_mean / moving_variance; ours are (out, in, kh, kw),
(C, 1, kh, kw) and weight / bias / running_mean / running_var.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_path
from ..preprocessing import Preprocessing
from ..data.segmentation import VOC_CLASSES
from ..weights import load_weights, read_weights
from ..weights.tf_checkpoint import read_tf_checkpoint
from .model import DeepLabConfig, DeepLabV3Plus

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "xception-deeplab"
# TensorFlow DeepLab's inputs: 2 * x / 255 - 1; evaluation on whole images at their own size.
DEEPLAB_PREPROCESSING = Preprocessing(image_size=513, crop_pct=1.0, interpolation="bilinear")
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
# Variables of the training run, not of the network.
_NOT_NETWORK = re.compile(r"(^global_step$|/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1|ExponentialMovingAverage)$)")


def tf_variable_names(model: DeepLabV3Plus) -> dict[str, str]:
    """Our state-dict key -> TensorFlow DeepLab's variable name, for every tensor of ``model``."""
    enc = model.encoder
    config = enc.config
    if not hasattr(config, "depth") or config.preact:
        raise ValueError(f"TensorFlow DeepLab checkpoints hold xception41/65/71 encoders, not {model.config.backbone!r}")
    if not model.config.head_depthwise_bn:
        raise ValueError("TensorFlow DeepLab has BN + ReLU after each depthwise conv of ASPP and decoder: "
                         "build the model with head_depthwise_bn=True")
    scope = f"xception_{config.depth}"
    blocks = len(enc.blocks)
    entry = 5 if config.depth == 71 else 3
    names: dict[str, str] = {}

    def tf_block(i: int) -> str:
        if i < entry:
            return f"{scope}/entry_flow/block{i + 1}/unit_1/xception_module"
        if i < blocks - 2:
            return f"{scope}/middle_flow/block1/unit_{i - entry + 1}/xception_module"
        return f"{scope}/exit_flow/block{i - (blocks - 2) + 1}/unit_1/xception_module"

    prefixes = [
        ("encoder.stem.0.", f"{scope}/entry_flow/conv1_1/"),
        ("encoder.stem.1.", f"{scope}/entry_flow/conv1_2/"),
        ("aspp.pool.", "image_pooling/"),
        ("aspp.conv0.", "aspp0/"),
        ("aspp.project.", "concat_projection/"),
        ("decoder.project.", "decoder/feature_projection0/"),
        ("decoder.conv0.", "decoder/decoder_conv0_"),
        ("decoder.conv1.", "decoder/decoder_conv1_"),
        ("classifier.", "logits/semantic/"),
    ]
    prefixes += [(f"aspp.atrous.{k}.", f"aspp{k + 1}_") for k in range(len(model.aspp.atrous))]
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            continue
        match = re.match(r"encoder\.blocks\.(\d+)\.(.*)", key)
        if match:
            head, rest = tf_block(int(match.group(1))) + "/", match.group(2)
            rest = re.sub(r"^stack\.conv(\d)\.", r"separable_conv\1_", rest)
        else:
            head, rest = next((tf, key[len(ours):]) for ours, tf in prefixes if key.startswith(ours))
        names[key] = head + _tf_leaf(rest)
    return names


_LEAVES = [  # our module.leaf at the end of a key -> TensorFlow's, in the order they are tried
    (r"conv_dw\.weight$", "depthwise/depthwise_weights"),
    (r"bn_dw\.(\w+)$", "depthwise/BatchNorm/{bn}"),
    (r"conv_pw\.weight$", "pointwise/weights"),
    (r"bn_pw\.(\w+)$", "pointwise/BatchNorm/{bn}"),
    (r"conv\.weight$", "weights"),
    (r"bn\.(\w+)$", "BatchNorm/{bn}"),
    (r"^weight$", "weights"),
    (r"^bias$", "biases"),
]


def _tf_leaf(rest: str) -> str:
    """``conv.weight`` -> ``weights``, ``bn.running_var`` -> ``BatchNorm/moving_variance``, the
    separable parts (``conv_dw`` / ``bn_dw``, ``conv_pw`` / ``bn_pw``) -> ``depthwise`` / ``pointwise``."""
    rest = rest.replace("shortcut.", "shortcut/")
    for pattern, tf in _LEAVES:
        match = re.search(pattern, rest)
        if match:
            return rest[:match.start()] + (tf.format(bn=_BN[match.group(1)]) if match.groups() else tf)
    raise ValueError(f"no TensorFlow name for {rest!r}")


def _to_torch(value: np.ndarray, key: str) -> torch.Tensor:
    if value.ndim == 4:
        # conv (kh, kw, in, out) -> (out, in, kh, kw); depthwise (kh, kw, C, 1) -> (C, 1, kh, kw)
        value = value.transpose(2, 3, 0, 1) if "conv_dw" in key else value.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def read_deeplab_checkpoint(path: str | os.PathLike, model: DeepLabV3Plus) -> dict[str, torch.Tensor]:
    """``model``'s state dict from a TensorFlow DeepLab checkpoint (``model.ckpt`` prefix, its
    ``.index`` or its folder); a ValueError naming every variable that is missing, left over or of
    another shape."""
    variables = read_tf_checkpoint(path)
    names = tf_variable_names(model)
    expected = model.state_dict()
    state, problems = {}, []
    for key, tf_name in names.items():
        if tf_name not in variables:
            problems.append(f"missing {tf_name} (for {key})")
            continue
        tensor = _to_torch(variables[tf_name], key)
        if tensor.shape != expected[key].shape:
            problems.append(f"{tf_name}: shape {tuple(variables[tf_name].shape)} does not fit {key} "
                            f"{tuple(expected[key].shape)}")
            continue
        state[key] = tensor
    used = set(names.values())
    extra = sorted(n for n in variables if n not in used and not _NOT_NETWORK.search(n))
    problems += [f"unexpected {n} {tuple(variables[n].shape)}" for n in extra]
    if problems:
        raise ValueError(f"{path}: does not fit DeepLabv3+ {model.config.backbone} with {model.num_classes} "
                         f"classes: " + "; ".join(problems))
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
    return state


def tf_checkpoint_num_classes(path: str | os.PathLike) -> int:
    """The number of classes of a TensorFlow DeepLab checkpoint's logits."""
    variables = read_tf_checkpoint(path)
    if "logits/semantic/biases" not in variables:
        raise ValueError(f"{path}: no logits/semantic/biases: not a DeepLab checkpoint")
    return int(variables["logits/semantic/biases"].shape[0])


def save_deeplab(model: DeepLabV3Plus, path: str | os.PathLike, *, class_names: list[str] | None = None,
                 preprocessing: Preprocessing | None = None) -> Path:
    """Write ``model``'s weights, config, class names and preprocessing to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    class_names = class_names if class_names is not None else getattr(model, "class_names", None)
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.num_classes}-class model")
    preprocessing = preprocessing or getattr(model, "preprocessing", None) or DEEPLAB_PREPROCESSING
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(model.config.to_dict()),
                "class_names": json.dumps(class_names), "preprocessing": json.dumps(preprocessing.to_dict())}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("wrote %s (DeepLabv3+ %s, %d classes)", path, model.config.backbone, model.num_classes)
    return path


def is_tf_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_dir():
        return any(path.glob("*.index"))
    return path.suffix == ".index" or Path(str(path) + ".index").is_file()


def load_deeplab(path: str | os.PathLike, **overrides: Any) -> DeepLabV3Plus:
    """A DeepLabv3+ from our ``.safetensors``, a training checkpoint of ``xception segment train``
    or a TensorFlow DeepLab checkpoint (xception65 unless ``backbone`` says otherwise).
    ``overrides``: :class:`DeepLabConfig` fields (e.g. ``output_stride=8``)."""
    if is_tf_checkpoint(path):
        num_classes = tf_checkpoint_num_classes(path)
        config = DeepLabConfig(**{"num_classes": num_classes, "head_depthwise_bn": True, **overrides})
        model = DeepLabV3Plus(config)
        model.load_state_dict(read_deeplab_checkpoint(path, model))
        model.class_names = default_class_names(num_classes)
        model.preprocessing = DEEPLAB_PREPROCESSING
        return model
    state, config, class_names, preprocessing = _read_ours(Path(path))
    config = {**config, "head_depthwise_bn": head_depthwise_bn(config, state), **overrides}
    model = DeepLabV3Plus(DeepLabConfig.from_dict(config))
    load_state_checked(model, state, path)
    model.class_names = class_names
    model.preprocessing = preprocessing
    return model


def _read_ours(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str] | None, Preprocessing]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError, OSError on a truncated file
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
        if meta.get("format") != SAFETENSORS_FORMAT:
            raise ValueError(f"{path}: not a DeepLabv3+ weights file (metadata format {meta.get('format')!r}; "
                             f"classification weights load as the encoder: --encoder-weights)")
        try:
            config = json.loads(meta["config"])
            class_names = json.loads(meta.get("class_names") or "null")
            preprocessing = Preprocessing.from_dict(json.loads(meta.get("preprocessing") or "{}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt metadata: {e}") from None
        return state, config, class_names, preprocessing
    from ..fileio import torch_load_safe

    ckpt = torch_load_safe(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != SEGMENTATION_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a DeepLabv3+ weights file or checkpoint of `xception segment train`")
    preprocessing = Preprocessing.from_dict(ckpt.get("preprocessing") or {})
    return ckpt["model"], dict(ckpt["config"]), ckpt.get("class_names"), preprocessing


SEGMENTATION_CHECKPOINT_FORMAT = "xception-deeplab-checkpoint"


def head_depthwise_bn(config: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """The head layout of a file of ours: as recorded, or, in files written before the option
    existed, read from its tensors."""
    return bool(config.get("head_depthwise_bn", "decoder.conv0.bn_dw.weight" in state))


def load_state_checked(model: DeepLabV3Plus, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
        raise ValueError(f"{path}: does not fit DeepLabv3+ {model.config.backbone}: " + ", ".join(parts))
    model.load_state_dict(state)


def load_encoder(model: DeepLabV3Plus, path: str | os.PathLike) -> DeepLabV3Plus:
    """Load ImageNet weights of the backbone (Keras, timm, ours: whatever the classifiers load)
    into ``model.encoder``; the file's classifier is left out. Returns ``model``."""
    weights = read_weights(path)
    if weights.model_name and weights.model_name != model.config.backbone:
        raise ValueError(f"{path}: holds a {weights.model_name!r} model, not the {model.config.backbone!r} encoder")
    load_weights(model.encoder, path, strict=False)
    model.preprocessing = model.encoder.preprocessing.replace(image_size=513, crop_pct=1.0)
    return model


CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")


def default_class_names(num_classes: int) -> list[str] | None:
    """VOC's names for 21 classes, Cityscapes' train ids for 19 (the model zoo's two main sets)."""
    return {21: list(VOC_CLASSES), 19: list(CITYSCAPES_CLASSES)}.get(num_classes)
