"""The modified aligned Xception of DeepLabv3+: Xception-41, -65, -71 and pre-activation 41p, 65p.

Differences from the original Xception (``seed.py``): every max-pool becomes a stride-2
separable conv, every block has three separable convs, batch norm follows both the depthwise and
the pointwise conv, the stem convs are padded, and the middle flow has 8 (41) or 16 (65, 71)
blocks. The pre-activation variants put BN + ReLU before each separable conv instead.

Module names follow timm's ``xception41`` ... ``xception65p`` state dicts, so the files timm
publishes (``xception65.tf_in1k``, ``xception65p.ra3_in1k``, ...) load as they are:

    stem.0 stem.1                          3x3 conv (stride 2), 3x3 conv: 32, 64 channels
    blocks.0 ... blocks.N-1                entry, middle, exit flow (XceptionModule)
      .shortcut .stack.conv1..conv3        1x1 projection, three separable convs
    head.fc                                classifier after global pooling

In the interface of :class:`~xception.models.base.XceptionBase`, ``stem`` and ``blocks`` are
``nn.Sequential`` containers; the exit flow is the last two blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import XceptionBase
from .config import AlignedXceptionConfig
from .layers import ConvBn, drop_path
from .registry import register_model


@dataclass(frozen=True)
class BlockSpec:
    in_chs: int
    out_chs: tuple[int, int, int]  # of the three separable convs
    stride: int = 1  # of the last separable conv and the shortcut
    residual: bool = True
    start_with_relu: bool = True  # only the non-preact exit block starts without (its convs end in ReLU)


def block_specs(depth: int) -> list[BlockSpec]:
    """Entry, middle and exit flow of Xception-``depth``."""
    def same(cin: int, cout: int, stride: int) -> BlockSpec:
        return BlockSpec(cin, (cout, cout, cout), stride)

    if depth == 71:
        entry = [same(64, 128, 2), same(128, 256, 1), same(256, 256, 2), same(256, 728, 1), same(728, 728, 2)]
    else:
        entry = [same(64, 128, 2), same(128, 256, 2), same(256, 728, 2)]
    middle = [same(728, 728, 1) for _ in range(8 if depth == 41 else 16)]
    exit_ = [BlockSpec(728, (728, 1024, 1024), 2),
             BlockSpec(1024, (1536, 1536, 2048), 1, residual=False, start_with_relu=False)]
    return entry + middle + exit_


class SeparableConvBn(nn.Module):
    """Depthwise 3x3 conv, BN, [ReLU], pointwise 1x1 conv, BN, [ReLU]."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, *, bn_eps: float,
                 act: bool) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, dilation, dilation, groups=in_chs, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_chs, eps=bn_eps)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_dw(self.conv_dw(x))  # (B, C_in, H/stride, W/stride)
        if self.act:
            x = F.relu(x)
        x = self.bn_pw(self.conv_pw(x))  # (B, C_out, H/stride, W/stride)
        return F.relu(x) if self.act else x


class PreSeparableConv(nn.Module):
    """[BN, ReLU], depthwise 3x3 conv, pointwise 1x1 conv (pre-activation)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, *, bn_eps: float,
                 first_act: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs, eps=bn_eps) if first_act else None
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, dilation, dilation, groups=in_chs, bias=False)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = F.relu(self.norm(x))
        return self.conv_pw(self.conv_dw(x))  # (B, C_out, H/stride, W/stride)


class XceptionModule(nn.Module):
    """Three separable convs, the last one strided, plus a residual (1x1 conv [+ BN] if needed).

    ``preact=False``: each separable conv is conv + BN (+ ReLU before it, or after it in the exit
    block); the shortcut is conv + BN. ``preact=True`` (timm's ``41p``/``65p``): the block opens
    with BN + ReLU, its separable convs are pre-activated, the residual adds to the activated input
    and the shortcut is a plain conv.
    """

    def __init__(self, spec: BlockSpec, *, preact: bool, stride: int, dilation: int, bn_eps: float,
                 drop_path: float) -> None:
        super().__init__()
        self.residual = spec.residual
        self.drop_path = drop_path
        needs_projection = spec.residual and (spec.out_chs[-1] != spec.in_chs or spec.stride != 1)
        if not needs_projection:
            self.shortcut = None
        elif preact:
            self.shortcut = nn.Conv2d(spec.in_chs, spec.out_chs[-1], 1, stride, bias=False)
        else:
            self.shortcut = ConvBn(spec.in_chs, spec.out_chs[-1], 1, stride, bn_eps=bn_eps, act=False)
        self.norm = nn.BatchNorm2d(spec.in_chs, eps=bn_eps) if preact else None
        layers: list[tuple[str, nn.Module]] = []
        cin = spec.in_chs
        for i, cout in enumerate(spec.out_chs):
            conv_stride = stride if i == 2 else 1
            if preact:
                conv: nn.Module = PreSeparableConv(cin, cout, conv_stride, dilation, bn_eps=bn_eps, first_act=i > 0)
            else:
                if spec.start_with_relu:
                    layers.append((f"act{i + 1}", nn.ReLU()))
                conv = SeparableConvBn(cin, cout, conv_stride, dilation, bn_eps=bn_eps, act=not spec.start_with_relu)
            layers.append((f"conv{i + 1}", conv))
            cin = cout
        self.stack = nn.Sequential(OrderedDict(layers))

    def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, tap)``: ``tap`` is the input of the last (strided) separable conv."""
        if self.norm is not None:
            x = F.relu(self.norm(x))  # (B, C_in, H, W)
        y = x
        tap = x
        for layer in self.stack:
            tap = y
            y = layer(y)
        return self._add_residual(x, y), tap  # (B, C_out, H/stride, W/stride), (B, C_mid, H, W)

    def forward_with_conv2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, output of stack.conv2)``: the second separable conv's output, before the ReLU
        that follows it (DeepLabv3+'s decoder reads this map, not the activated one)."""
        if self.norm is not None:
            x = F.relu(self.norm(x))
        y = x
        conv2 = x
        for name, layer in self.stack.named_children():
            y = layer(y)
            if name == "conv2":
                conv2 = y  # (B, C_mid, H, W)
        return self._add_residual(x, y), conv2

    def _add_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return y
        skip = x if self.shortcut is None else self.shortcut(x)
        return drop_path(y, self.drop_path, self.training) + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x)[0]


class ClassifierHead(nn.Module):
    """Holds the classifier ``fc`` under timm's key ``head.fc`` (an identity when ``num_classes`` is 0).

    Pooling and dropout are the model's ``forward_head``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (B, num_classes)


class AlignedXception(XceptionBase):
    """Modified aligned Xception. Build it from an :class:`AlignedXceptionConfig`.

    ``forward(x)`` = ``forward_head(forward_features(x))``; ``forward_features`` returns the
    (B, 2048, H/os, W/os) map after the last ReLU. Any input size works (all convs are padded).
    Feature taps 0-3 are taken inside the strided blocks, at the input of their strided separable
    conv (reductions 2, 4, 8, 16); tap 4 is the final block's output (before the pre-activation
    models' last ReLU).
    """

    config_class = AlignedXceptionConfig
    classifier_name = "head.fc"

    def __init__(self, config: AlignedXceptionConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        eps = c.bn_eps
        self.final_relu = c.preact  # pre-activation blocks end in a conv

        self.stem = nn.Sequential(
            ConvBn(c.in_chans, 32, 3, 2, bn_eps=eps, act=True),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, 1, 1, bias=False) if c.preact else ConvBn(32, 64, 3, 1, bn_eps=eps, act=True),
        )

        specs = block_specs(c.depth)
        drop_rates = torch.linspace(0, c.drop_path_rate, len(specs)).tolist()
        stride, dilation = 2, 1
        blocks = []
        for i, (spec, dpr) in enumerate(zip(specs, drop_rates)):
            block_stride = spec.stride
            block_dilation = dilation
            if spec.stride > 1:
                # Tap before each downsampling: the input of this block's strided conv.
                tap = f"blocks.{i}.stack.conv2" if c.preact else f"blocks.{i}.stack.act3"
                self.feature_info.append(dict(num_chs=spec.out_chs[-2], reduction=stride, module=tap))
                self.feature_taps.append(i)
                if stride * spec.stride > c.output_stride:
                    dilation *= spec.stride  # stride 1 here, dilation in the layers that follow
                    block_stride = 1
                else:
                    stride *= spec.stride
            blocks.append(XceptionModule(spec, preact=c.preact, stride=block_stride, dilation=block_dilation,
                                         bn_eps=eps, drop_path=dpr))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = specs[-1].out_chs[-1]
        self.feature_info.append(dict(num_chs=self.num_features, reduction=stride, module=f"blocks.{len(specs) - 1}"))
        self.feature_taps.append(len(specs))  # the exit_tail output: the last block's

        self.head = ClassifierHead(self.num_features, c.num_classes)
        self._init_weights()

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, num_classes)


def _build(depth: int, preact: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> AlignedXception:
    for name, value in (("depth", depth), ("preact", preact)):
        if name in kwargs and kwargs.pop(name) != value:
            raise ValueError(f"this model has {name}={value!r}; use another model name for a different {name}")
    return AlignedXception(AlignedXceptionConfig(depth=depth, preact=preact, **{**defaults, **kwargs}))


@register_model
def xception41(**kwargs) -> AlignedXception:
    """Modified aligned Xception-41 (timm ``xception41``). ``kwargs``: :class:`AlignedXceptionConfig`."""
    return _build(41, False, {"bn_eps": 1e-3}, kwargs)


@register_model
def xception65(**kwargs) -> AlignedXception:
    """Modified aligned Xception-65 (timm ``xception65``, DeepLabv3+'s encoder)."""
    return _build(65, False, {"bn_eps": 1e-3}, kwargs)


@register_model
def xception71(**kwargs) -> AlignedXception:
    """Modified aligned Xception-71 (timm ``xception71``)."""
    return _build(71, False, {"bn_eps": 1e-3}, kwargs)


@register_model
def xception41p(**kwargs) -> AlignedXception:
    """Pre-activation aligned Xception-41 (timm ``xception41p``; BN eps 1e-5)."""
    return _build(41, True, {"bn_eps": 1e-5}, kwargs)


@register_model
def xception65p(**kwargs) -> AlignedXception:
    """Pre-activation aligned Xception-65 (timm ``xception65p``)."""
    return _build(65, True, {"bn_eps": 1e-3}, kwargs)
