"""Batch-norm folding: each conv -> BN pair becomes one conv with the BN's scale and shift.

Pairs are found by running the model once with hooks, so any conv -> BN pair is found whatever
the module structure (stride, dilation, groups, depthwise or not). The folded copy is checked
against the original on that same input. Export and every fast inference path start here.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import torch
from torch import nn

from .parity import relative_error

log = logging.getLogger(__name__)


def _example_input(model: nn.Module, size: int, device: torch.device) -> torch.Tensor:
    in_chans = getattr(getattr(model, "config", None), "in_chans", None)
    if in_chans is None:  # not one of ours: the first conv says
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    return torch.randn(1, in_chans, size, size, device=device)


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Names of (conv, batch norm) pairs where the batch norm reads exactly the conv's output.

    Found by running ``model(example)`` with hooks; modules called more than once are left out
    (their pairing would not be unique).
    """
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so their ids stay unique
    calls: Counter[str] = Counter()
    pairs: list[tuple[str, str]] = []
    handles = []

    def on_conv(name: str):
        def hook(mod, inp, out):
            calls[name] += 1
            produced[id(out)] = name
            alive.append(out)
        return hook

    def on_bn(name: str):
        def hook(mod, inp):
            calls[name] += 1
            conv = produced.get(id(inp[0]))
            if conv is not None:
                pairs.append((conv, name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(on_bn(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    convs = Counter(c for c, _ in pairs)
    return [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1 and convs[c] == 1]


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv), in place: scale each output filter, add the shift as the conv's bias."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_(w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(b.to(conv.bias.dtype))


def fold_batchnorms(model: nn.Module, *, example_size: int = 64, check: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> BN pair folded into the conv.

    Folded batch norms become ``nn.Identity``; the others (e.g. after a nonlinearity) stay.
    With ``check``, the copy is compared with the original on the example input (fp32) and a
    ``RuntimeError`` is raised if they differ (which would mean a conv output had other readers).
    """
    folded = copy.deepcopy(model).eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = _example_input(model, example_size, device)
    try:
        pairs = find_conv_bn_pairs(folded, example)
    except (RuntimeError, ValueError):  # too small for this model: retry at ImageNet size
        example = _example_input(model, 224, device)
        pairs = find_conv_bn_pairs(folded, example)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        if conv.out_channels != bn.num_features:
            continue
        fold_conv_bn_(conv, bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, attr, nn.Identity())
    log.debug("folded %d batch norms", len(pairs))
    if check:
        was_training = model.training
        try:
            with torch.no_grad():
                err = relative_error(folded(example), model.eval()(example))
        finally:
            model.train(was_training)
        if err > 1e-4:
            raise RuntimeError(f"batch-norm folding changed the model's output (relative error {err:.2e})")
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded
