"""Matching a state dict to a model: the one check behind every load, with one message style.

``{source}: weights do not fit {model}: 2 missing (...); 1 mis-shaped (file vs model) (...)``.
:func:`match_state_dict` also knows the layouts of other implementations (DDP / compile
prefixes, Cadene's ``last_linear`` and its old squeezed separable-conv shapes).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .readers import WeightFile

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    def strip(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    return {strip(k): v for k, v in state.items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DataParallel/DDP wrapper or a torch.compile'd module."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def implied_config(weights: WeightFile) -> dict[str, Any]:
    """Config options a foreign state dict implies: class count (either layout) and input channels (seed layout)."""
    state = strip_prefixes(weights.state_dict)
    config: dict[str, Any] = {}
    for head in ("fc.weight", "last_linear.weight", "head.fc.weight"):
        if head in state:
            config["num_classes"] = int(state[head].shape[0])
            break
    else:
        if "conv1.weight" in state:  # the seed layout with no classifier
            config["num_classes"] = 0
    if "conv1.weight" in state and state["conv1.weight"].ndim == 4:
        config["in_chans"] = int(state["conv1.weight"].shape[1])
    return config


def adapt(weights: WeightFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's state dict in ``model``'s naming and shapes (as far as generic rules go)."""
    state = strip_prefixes(weights.state_dict)
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


def match_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str | os.PathLike, *,
                     strict_classifier: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """Check ``state`` against ``model``; return what to load and whether the classifier is in it.

    Any mismatch outside the classifier raises a ValueError naming ``source`` and listing the
    tensors. A classifier of another class count is an error if ``strict_classifier``, else left
    out (the model keeps its own). ``num_batches_tracked`` may be absent (Keras and old files).
    """
    target = model.state_dict()
    head = _classifier_prefix(model)
    in_head = lambda k: k.startswith(head)  # noqa: E731
    optional = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
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
        raise ValueError(f"{source}: weights do not fit {name}: {'; '.join(problems)}")

    if head_fits:
        return state, True
    if strict_classifier:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"{source}: weights do not fit {name}: classifier {head_file or 'absent'} vs "
                         f"{head_model or 'absent'} (file vs model; give num_classes to fine-tune)")
    log.info("%s: loaded all but the classifier: the file's %s does not fit %s, which stays as initialised",
             source, head_file or "(no classifier)", head_model or "(no classifier)")
    return {k: v for k, v in state.items() if not in_head(k)}, False


def copy_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy matched tensors into ``model`` (in place, in the model's dtypes and devices)."""
    target = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value.to(target[key].dtype))


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load a state dict of exactly ``model``'s layout (checkpoints, EMA weights), or raise a
    one-line ValueError naming ``source`` and what does not fit."""
    matched, _ = match_state_dict(strip_prefixes(state), model, source, strict_classifier=True)
    copy_into(model, matched)
