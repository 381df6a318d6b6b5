"""The modified aligned Xception of DeepLabv3+: Xception-41, -65, -71 and pre-activation 41p, 65p.

Differences from the original Xception (``model.py``): every max-pool becomes a stride-2
separable conv, every block has three separable convs, batch norm follows both the depthwise and
the pointwise conv, the stem convs are padded, and the middle flow has 8 (41) or 16 (65, 71)
blocks. The pre-activation variants put BN + ReLU before each separable conv instead.

Module names follow timm's ``xception41`` ... ``xception65p`` state dicts, so the files timm
publishes (``xception65.tf_in1k``, ``xception65p.ra3_in1k``, ...) load as they are:

    stem.0 stem.1                          3x3 conv (stride 2), 3x3 conv: 32, 64 channels
    blocks.0 ... blocks.N-1                entry, middle, exit flow (XceptionModule)
      .shortcut .stack.conv1..conv3        1x1 projection, three separable convs
    head.fc                                classifier after global pooling
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .features import feature_take_indices
from .seed import check_images, checkpoint_module, drop_path
from .registry import register_model

DEPTHS = (41, 65, 71)


@dataclass(frozen=True)
class AlignedXceptionConfig(ModelConfig):
    """A modified aligned Xception.

    Args:
        depth: 41, 65 or 71 (41: 8 middle blocks; 65: 16; 71: 16 and two more entry blocks).
        preact: pre-activation blocks (BN + ReLU before each separable conv; timm's ``41p``/``65p``).
        num_classes: classifier outputs; 0 removes the classifier.
        in_chans: input image channels.
        drop_rate: dropout probability before the classifier.
        global_pool: ``"avg"`` or ``"max"``.
        output_stride: 32, 16 or 8; strides beyond it become dilation, the weights stay the same.
        drop_path_rate: stochastic depth over the residual blocks, rising linearly to this value.
        bn_eps: batch-norm epsilon (1e-3 for the TensorFlow-trained weights; 1e-5 for ``xception41p``).
    """

    depth: int = 65
    preact: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    global_pool: str = "avg"
    output_stride: int = 32
    drop_path_rate: float = 0.0
    bn_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, got {self.depth!r}")
        if not isinstance(self.preact, bool):
            raise ValueError(f"preact must be True or False, got {self.preact!r}")
        self._check_common()


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


class ConvBn(nn.Module):
    """Conv (no bias, 'same'-size symmetric padding), BatchNorm, optional ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, *, bn_eps: float,
                 act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


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
        return self.conv_pw(self.conv_dw(x))


class XceptionModule(nn.Module):
    """Three separable convs, the last one strided, plus a residual (1x1 conv + BN if needed).

    ``forward(x, with_tap=True)`` also returns the feature tap: the input of the strided conv.
    """

    def __init__(self, spec: BlockSpec, *, stride: int, dilation: int, bn_eps: float, drop_path: float) -> None:
        super().__init__()
        self.residual = spec.residual
        self.drop_path = drop_path
        needs_projection = spec.out_chs[-1] != spec.in_chs or spec.stride != 1
        self.shortcut = (ConvBn(spec.in_chs, spec.out_chs[-1], 1, stride, bn_eps=bn_eps, act=False)
                         if spec.residual and needs_projection else None)
        layers: list[tuple[str, nn.Module]] = []
        cin = spec.in_chs
        for i, cout in enumerate(spec.out_chs):
            if spec.start_with_relu:
                layers.append((f"act{i + 1}", nn.ReLU()))
            layers.append((f"conv{i + 1}", SeparableConvBn(cin, cout, stride if i == 2 else 1, dilation,
                                                            bn_eps=bn_eps, act=not spec.start_with_relu)))
            cin = cout
        self.stack = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor, with_tap: bool = False):
        y = self.stack[:-1](x)
        tap = y  # after act3: the last activation before the (strided) conv3
        y = self.stack[-1](y)
        if self.residual:
            skip = x if self.shortcut is None else self.shortcut(x)
            y = drop_path(y, self.drop_path, self.training) + skip
        return (y, tap) if with_tap else y


class PreXceptionModule(nn.Module):
    """Pre-activation block: BN + ReLU, three pre-activated separable convs, residual on the
    activated input (1x1 conv if needed), as timm's ``41p``/``65p``."""

    def __init__(self, spec: BlockSpec, *, stride: int, dilation: int, bn_eps: float, drop_path: float) -> None:
        super().__init__()
        self.residual = spec.residual
        self.drop_path = drop_path
        needs_projection = spec.out_chs[-1] != spec.in_chs or spec.stride != 1
        self.shortcut = (nn.Conv2d(spec.in_chs, spec.out_chs[-1], 1, stride, bias=False)
                         if spec.residual and needs_projection else None)
        self.norm = nn.BatchNorm2d(spec.in_chs, eps=bn_eps)
        layers: list[tuple[str, nn.Module]] = []
        cin = spec.in_chs
        for i, cout in enumerate(spec.out_chs):
            layers.append((f"conv{i + 1}", PreSeparableConv(cin, cout, stride if i == 2 else 1, dilation,
                                                            bn_eps=bn_eps, first_act=i > 0)))
            cin = cout
        self.stack = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor, with_tap: bool = False):
        x = F.relu(self.norm(x))
        y = self.stack[:-1](x)
        tap = y  # conv2's output, before conv3's BN + ReLU
        y = self.stack[-1](y)
        if self.residual:
            skip = x if self.shortcut is None else self.shortcut(x)
            y = drop_path(y, self.drop_path, self.training) + skip
        return (y, tap) if with_tap else y


class ClassifierHead(nn.Module):
    """Global pooling, dropout, linear classifier (``fc``; an identity when ``num_classes`` is 0)."""

    def __init__(self, in_features: int, num_classes: int, *, global_pool: str, drop_rate: float) -> None:
        super().__init__()
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.amax(x, dim=(2, 3)) if self.global_pool == "max" else torch.mean(x, dim=(2, 3))  # (B, C)
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)


class AlignedXception(nn.Module):
    """Modified aligned Xception. Build it from an :class:`AlignedXceptionConfig`.

    ``forward(x)`` = ``forward_head(forward_features(x))``; ``forward_features`` returns the
    (B, 2048, H/os, W/os) map after the last ReLU. Any input size works (all convs are padded).
    """

    def __init__(self, config: AlignedXceptionConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = AlignedXceptionConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.num_classes = c.num_classes
        self.grad_checkpointing = False
        eps = c.bn_eps

        self.stem = nn.Sequential(
            ConvBn(c.in_chans, 32, 3, 2, bn_eps=eps, act=True),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, 1, 1, bias=False) if c.preact else ConvBn(32, 64, 3, 1, bn_eps=eps, act=True),
        )

        specs = block_specs(c.depth)
        module = PreXceptionModule if c.preact else XceptionModule
        drop_rates = torch.linspace(0, c.drop_path_rate, len(specs)).tolist()
        stride, dilation = 2, 1
        self.feature_info: list[dict] = []
        self._feature_ends: list[int] = []  # block index of each tap; the last is the final block's output
        blocks = []
        for i, (spec, dpr) in enumerate(zip(specs, drop_rates)):
            block_stride = spec.stride
            block_dilation = dilation
            if spec.stride > 1:
                # Tap before each downsampling: the input of this block's strided conv.
                tap = f"blocks.{i}.stack.conv2" if c.preact else f"blocks.{i}.stack.act3"
                self.feature_info.append(dict(num_chs=spec.out_chs[-2], reduction=stride, module=tap))
                self._feature_ends.append(i)
                if stride * spec.stride > c.output_stride:
                    dilation *= spec.stride  # stride 1 here, dilation in the layers that follow
                    block_stride = 1
                else:
                    stride *= spec.stride
            blocks.append(module(spec, stride=block_stride, dilation=block_dilation, bn_eps=eps, drop_path=dpr))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = specs[-1].out_chs[-1]
        self.feature_info.append(dict(num_chs=self.num_features, reduction=stride, module=f"blocks.{len(specs) - 1}"))
        self._feature_ends.append(len(specs) - 1)

        self.head = ClassifierHead(self.num_features, c.num_classes, global_pool=c.global_pool, drop_rate=c.drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_chans)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0 removes it)."""
        changes: dict[str, Any] = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = dataclasses.replace(self.config, **changes)
        self.num_classes = num_classes
        device = self.stem[0].conv.weight.device
        self.head = ClassifierHead(self.num_features, num_classes, global_pool=self.config.global_pool,
                                   drop_rate=self.config.drop_rate).to(device)

    def _run_block(self, block: nn.Module, x: torch.Tensor, with_tap: bool = False):
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_module(block, x, with_tap)
        return block(x, with_tap)

    def _final_act(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation blocks end in a conv: one more ReLU (not in place, the map is a feature tap).
        return F.relu(x) if self.config.preact else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)  # (B, 64, H/2, W/2)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self._final_act(x)  # (B, 2048, H/os, W/os)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the feature maps of ``feature_info`` (timm's interface).

        Taps 0-3 are taken inside the strided blocks, at the input of their strided separable conv
        (reductions 2, 4, 8, 16); tap 4 is the final block's output (before the pre-activation
        models' last ReLU). ``indices``: ``None`` all, an int ``n`` the last ``n``, or a sequence.
        ``norm`` is accepted for timm compatibility (no final norm). With ``stop_early`` the
        blocks after the deepest requested tap are skipped and ``features`` is the output of the
        last block run.

        Returns:
            ``(features, maps)``, or ``maps`` if ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self._check_input(x)
        last = len(self._feature_ends) - 1
        end = self._feature_ends[max_index] if stop_early else self._feature_ends[-1]
        maps = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks[:end + 1]):
            tap_index = self._feature_ends.index(i) if i in self._feature_ends[:last] else None
            if tap_index is None:
                x = self._run_block(block, x)
                if i == self._feature_ends[last] and last in take:
                    maps.append(x)
            else:
                x, tap = self._run_block(block, x, True)
                if tap_index in take:
                    maps.append(tap)
        if intermediates_only:
            return maps
        if end == self._feature_ends[-1]:
            x = self._final_act(x)
        return x, maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
