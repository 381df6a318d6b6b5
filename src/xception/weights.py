"""Weights people already have: Keras ``.h5``, timm/Cadene ``.pth``, our ``.safetensors`` and checkpoints.

Every source is read into one form, a :class:`WeightFile`: a state dict plus what the file says
about the model it came from (name, config options, class names). :func:`load_pretrained` builds
the model the file implies (explicit options win) and loads it; :func:`load_weights` loads into a
model you already have. Nothing is ever unpickled: ``torch.load(weights_only=True)``, h5py and
safetensors only.

    conv1.weight  <- Keras block1_conv1/kernel (kh, kw, in, out), transposed to (out, in, kh, kw)
    block1.skip   <- Keras conv2d / batch_normalization: the four unnamed residual layers, by order
    fc.weight     <- Keras predictions/kernel (2048, 1000), transposed
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "REMOTE_WEIGHTS",
    "RemoteWeights",
    "WeightFile",
    "download_weights",
    "load_pretrained",
    "load_weights",
    "read_weights",
    "save_safetensors",
]


# --------------------------------------------------------------------------------------------
# Public downloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteWeights:
    """A public weight file: where it lives and how to verify it.

    Args:
        url: download address; the file keeps the address's base name in the cache.
        md5: full md5 hex digest (Keras publishes these), or
        sha256_prefix: leading hex digits of the sha256 (torch.hub style, in the file name).
    """

    url: str
    md5: str | None = None
    sha256_prefix: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def verify(self, path: Path) -> bool:
        algorithm, expected = ("md5", self.md5) if self.md5 else ("sha256", self.sha256_prefix)
        if not expected:
            raise ValueError(f"no checksum recorded for {self.url}")
        digest = hashlib.new(algorithm)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest().startswith(expected.lower())


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
REMOTE_WEIGHTS: dict[str, RemoteWeights] = {
    "keras": RemoteWeights(_KERAS_URL + "xception_weights_tf_dim_ordering_tf_kernels.h5",
                           md5="0a58e3b7378bc2990ea3b43d5981f1f6"),
    "keras_notop": RemoteWeights(_KERAS_URL + "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                 md5="b0042744bf5b25fce3cb969f33bebb97"),
    "timm": RemoteWeights("https://github.com/rwightman/pytorch-image-models/releases/download/"
                          "v0.1-cadene/xception-43020ad28.pth", sha256_prefix="43020ad28"),
}


def download_weights(source: str, *, progress: bool = True) -> Path:
    """Fetch ``REMOTE_WEIGHTS[source]`` into ``torch.hub.get_dir()/checkpoints``, verified.

    A cached file that passes the checksum is reused. The download goes to a temporary file in the
    same folder and replaces the final name only once verified, so no half file is ever left.
    """
    if source not in REMOTE_WEIGHTS:
        raise ValueError(f"unknown weights {source!r}; named sources: {', '.join(REMOTE_WEIGHTS)}")
    remote = REMOTE_WEIGHTS[source]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / remote.filename
    if target.is_file():
        if remote.verify(target):
            log.info("using cached %s", target)
            return target
        log.warning("cached %s fails its checksum; downloading it again", target)

    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", remote.url, target)
    fd, tmp = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not remote.verify(Path(tmp)):
            raise ValueError(f"checksum mismatch for {remote.url}: the download is corrupt; nothing was kept")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# --------------------------------------------------------------------------------------------
# Reading files into one form
# --------------------------------------------------------------------------------------------


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
        foreign: keys follow another implementation (timm/Cadene): prefixes, renames and reshapes apply.
    """

    path: Path
    kind: str
    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    foreign: bool = False


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
        return _read_keras_h5(path)
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


def torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors: a pickle that asks for code is refused
    (nothing from it runs), a truncated or foreign file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler stopped: nothing from the file ran
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"{path}: refused: unpickling it would call {found[1]}, not build tensors; "
                             "nothing from it was run") from None
        raise ValueError(f"{path}: not a weights file the safe loader (torch.load weights_only=True) "
                         "accepts; nothing from it was run") from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, ...
        first = _ANSI.sub("", str(e).strip()).split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch weights file (truncated or corrupt?): {first}") from None


def _read_torch(path: Path) -> WeightFile:
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    if obj.get("format") == "xception-checkpoint":
        weights = obj.get("ema") if obj.get("ema") is not None else obj.get("model")
        if not isinstance(weights, dict):
            raise ValueError(f"{path}: xception checkpoint without 'model' weights")
        log.info("%s: using the %s weights of the checkpoint", path, "EMA" if obj.get("ema") is not None else "model")
        return WeightFile(path, "checkpoint", _tensors_only(weights, path), model_name=obj.get("model_name"),
                          config=dict(obj.get("config") or {}), class_names=obj.get("class_names"))
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
    if meta.get("format") != "xception":
        return WeightFile(path, "safetensors", state, foreign=True)
    try:
        config = json.loads(meta.get("config") or "{}")
        class_names = json.loads(meta.get("class_names") or "null")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata: {e}") from None
    return WeightFile(path, "safetensors", state, model_name=meta.get("model_name"), config=config,
                      class_names=class_names)


# ---- Keras HDF5 ----------------------------------------------------------------------------

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


def _read_keras_h5(path: Path) -> WeightFile:
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
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
    config = {"bn_eps": 1e-3, "pool_padding": "same", "num_classes": num_classes}
    return WeightFile(path, "keras", state, model_name="xception", config=config)


# --------------------------------------------------------------------------------------------
# Matching a state dict to a model
# --------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def strip(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    return {strip(k): v for k, v in state.items()}


def _implied_config(weights: WeightFile) -> dict[str, Any]:
    """Config options a foreign state dict implies: class count and input channels of the seed layout."""
    state = _strip_prefixes(weights.state_dict)
    config: dict[str, Any] = {}
    for head in ("fc.weight", "last_linear.weight"):
        if head in state:
            config["num_classes"] = int(state[head].shape[0])
            break
    else:
        if "conv1.weight" in state:  # the seed layout with no classifier
            config["num_classes"] = 0
    if "conv1.weight" in state and state["conv1.weight"].ndim == 4:
        config["in_chans"] = int(state["conv1.weight"].shape[1])
    return config


def _adapt(weights: WeightFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's state dict in ``model``'s naming and shapes (as far as generic rules go)."""
    state = _strip_prefixes(weights.state_dict)
    if not weights.foreign:
        return state
    target = model.state_dict()
    if "fc.weight" in target and "fc.weight" not in state:  # Cadene's live model: last_linear
        state = {("fc." + k[len("last_linear."):] if k.startswith("last_linear.") else k): v
                 for k, v in state.items()}
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state)
    for key, value in state.items():  # old Cadene: depthwise (C,3,3), pointwise (O,C)
        if key in target and value.shape != target[key].shape and _same_but_singletons(value.shape, target[key].shape):
            state[key] = value.reshape(target[key].shape)
    return state


def _same_but_singletons(a: torch.Size, b: torch.Size) -> bool:
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _classifier_prefix(model: nn.Module) -> str:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return "fc."
    head = get()
    for name, module in model.named_modules():
        if module is head and name:
            return name + "."
    return "fc."


def _describe(items: list[str], what: str) -> str:
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{len(items)} {what} ({shown})"


def _match(state: dict[str, torch.Tensor], model: nn.Module, path: Path, *,
           strict_classifier: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """Check ``state`` against ``model``; return what to load and whether the classifier is in it.

    Any mismatch outside the classifier raises a ValueError listing the tensors. A classifier of
    another class count is an error if ``strict_classifier``, else left out (the model keeps its own).
    """
    target = model.state_dict()
    head = _classifier_prefix(model)
    in_head = lambda k: k.startswith(head)  # noqa: E731
    optional = lambda k: k.endswith("num_batches_tracked")  # noqa: E731  absent from Keras and old files
    missing = [k for k in target if k not in state and not optional(k) and not in_head(k)]
    unexpected = [k for k in state if k not in target and not in_head(k)]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                 for k in state if k in target and not in_head(k) and state[k].shape != target[k].shape]
    head_file = {k: tuple(v.shape) for k, v in state.items() if in_head(k)}
    head_model = {k: tuple(v.shape) for k, v in target.items() if in_head(k)}
    head_fits = head_file == head_model
    if missing or unexpected or misshaped:
        name = getattr(model, "model_name", type(model).__name__)
        problems = [_describe(items, what) for items, what in
                    ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "mis-shaped (file vs model)"))
                    if items]
        if not head_fits:
            problems.append(f"classifier {head_file or 'absent'} vs {head_model or 'absent'}")
        raise ValueError(f"{path}: weights do not fit {name}: {'; '.join(problems)}")

    if head_fits:
        return state, True
    if strict_classifier:
        raise ValueError(f"{path}: classifier does not fit: file has {head_file or 'no classifier'}, "
                         f"model has {head_model or 'no classifier'} (pass num_classes to fine-tune)")
    log.info("%s: loaded all but the classifier: the file's %s does not fit %s, which stays as initialised",
             path, head_file or "(no classifier)", head_model or "(no classifier)")
    return {k: v for k, v in state.items() if not in_head(k)}, False


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DataParallel/DDP wrapper or a torch.compile'd module."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value.to(target[key].dtype))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _resolve(source: str | os.PathLike) -> Path:
    if isinstance(source, str) and source in REMOTE_WEIGHTS:
        return download_weights(source)
    return Path(source)


def load_pretrained(name: str | None, source: str | os.PathLike, **kwargs) -> nn.Module:
    """Build the model a weight file implies and load it (``create_model(name, pretrained=source)``).

    Args:
        name: registered model name; ``None`` takes the one the file records (else ``"xception"``).
        source: ``"keras"``, ``"keras_notop"``, ``"timm"`` (downloaded, verified, cached) or a path to a
            Keras ``.h5``, a timm/Cadene ``.pth``, our ``.safetensors`` or our training checkpoint.
        **kwargs: config options; they override what the file implies. A ``num_classes`` other than
            the file's loads everything but the classifier, which stays freshly initialised.

    The model comes back in training mode, as ``create_model`` builds it; call ``.eval()`` to infer.
    Its ``class_names`` attribute holds the file's class names (None if it records none).
    """
    from .registry import create_model

    weights = read_weights(_resolve(source))
    if weights.model_name and name and weights.model_name != name:
        raise ValueError(f"{weights.path}: holds a {weights.model_name!r} model, not {name!r}")
    name = name or weights.model_name or "xception"
    implied = weights.config if not weights.foreign else _implied_config(weights)
    config = {**implied, **kwargs}
    try:
        model = create_model(name, **config)
    except TypeError as e:  # an option this version's config does not have
        raise ValueError(f"{weights.path}: cannot build {name!r} with the file's options {config}: {e}") from None
    # Only an explicit num_classes may leave the file's classifier out (fine-tuning to other classes).
    state, with_head = _match(_adapt(weights, model), model, weights.path,
                              strict_classifier="num_classes" not in kwargs)
    _load_into(model, state)
    model.class_names = weights.class_names if with_head else None
    log.info("loaded %s weights from %s into %s", weights.kind, weights.path, name)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weight file of any supported kind into an existing ``model`` (in place; returns it).

    ``strict=False`` only relaxes the classifier: one of another class count is left as it is.
    Every other mismatch (missing, unexpected or mis-shaped tensors) is a ValueError either way.
    """
    wrapper, model = model, _unwrap(model)
    weights = read_weights(_resolve(path))
    if weights.model_name and getattr(model, "model_name", weights.model_name) != weights.model_name:
        raise ValueError(f"{weights.path}: holds a {weights.model_name!r} model, not {model.model_name!r}")
    config = getattr(model, "config", None)
    if weights.kind == "keras" and config is not None:
        differ = {k: v for k, v in weights.config.items() if k != "num_classes" and getattr(config, k, v) != v}
        if differ:
            log.warning("%s: Keras weights expect %s; this model has %s: outputs will differ from Keras",
                        weights.path, differ, {k: getattr(config, k) for k in differ})
    state, _ = _match(_adapt(weights, model), model, weights.path, strict_classifier=strict)
    _load_into(model, state)
    return wrapper


def save_safetensors(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write ``model``'s weights and what rebuilds it (name, config, class names) to ``path``, atomically."""
    from safetensors.torch import save_file

    from .registry import list_models

    path = Path(path)
    model = _unwrap(model)
    model_name = getattr(model, "model_name", None) or type(model).__name__.lower()
    if model_name not in list_models():
        raise ValueError(f"cannot record the model: {model_name!r} is not a registered model name")
    config = getattr(model, "config", None)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    if class_names is not None and config is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {config.num_classes}-class model")
    metadata = {
        "format": "xception",
        "model_name": model_name,
        "config": json.dumps(dataclasses.asdict(config) if config is not None else {}),
        "class_names": json.dumps(list(class_names) if class_names is not None else None),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s (%s, %d tensors)", path, model_name, len(tensors))
    return path
