"""DeepLabv3+ (Chen et al., ECCV 2018) on any backbone of the registry.

    encoder     a registered model without its classifier, dilated to ``output_stride`` (16 or 8)
    aspp        atrous spatial pyramid pooling on the encoder's last map: image pooling, a 1x1 conv
                and three 3x3 atrous separable convs (rates 6/12/18 at output stride 16, doubled
                at 8), concatenated and projected to 256 channels
    decoder     the stride-4 features projected to 48 channels, concatenated with the upsampled
                ASPP output, two 3x3 separable convs of 256
    classifier  1x1 conv to ``num_classes``, upsampled to the input size

Module names and computations follow TensorFlow DeepLab's ``xception_65`` model so that its
checkpoints load exactly (``weights.read_deeplab_checkpoint``): batch-norm epsilon 1e-3 in the
encoder and 1e-5 in ASPP and decoder, every bilinear resize with ``align_corners=True``, and the
decoder reading the aligned Xception's second separable conv of the stride-4 block before its ReLU.
One difference is a default: TensorFlow DeepLab puts BN + ReLU between the depthwise and the
pointwise conv of every separable conv of ASPP and decoder; here that is ``head_depthwise_bn=True``
(set when a TensorFlow checkpoint loads). New models default to depthwise, pointwise, then one
BN + ReLU, which learns much faster from a random head (benchmarks/README.md, DeepLabv3+).
``set_output_stride`` re-dilates the same weights (train at 16, evaluate at 8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.aligned import AlignedXception
from ..models.layers import ConvBn, check_images, checkpoint_module
from ..models.registry import build_model, list_models

torch.fx.wrap("check_images")

ASPP_RATES = (6, 12, 18)  # at output stride 16; scaled by 16 / output_stride


@dataclass(frozen=True)
class DeepLabConfig:
    """Args:
        backbone: a name of :func:`~xception.list_models` (``xception65`` as the paper).
        num_classes: classes of the masks (21 for PASCAL VOC, 19 for Cityscapes).
        output_stride: 16 or 8: input size / encoder output size.
        in_chans: input image channels.
        aspp_channels, low_level_channels, decoder_channels: 256, 48, 256 in the paper.
        dropout: before the decoder (TensorFlow DeepLab keeps 0.9 of the ASPP output).
        head_depthwise_bn: BN + ReLU after each depthwise conv of ASPP and decoder, as TensorFlow
            DeepLab (its checkpoints need it); False: one BN + ReLU after the pointwise conv.
        head_bn_eps: batch-norm epsilon of ASPP and decoder (TensorFlow DeepLab's 1e-5).
        encoder_bn_eps: the encoder's (None: the backbone's default, 1e-3 for the aligned models).
        encoder_options: more options of the backbone's config, e.g. ``{"middle_blocks": 0}``.
    """

    backbone: str = "xception65"
    num_classes: int = 21
    output_stride: int = 16
    in_chans: int = 3
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    dropout: float = 0.1
    head_depthwise_bn: bool = False
    head_bn_eps: float = 1e-5
    encoder_bn_eps: float | None = None
    encoder_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in list_models():
            raise ValueError(f"backbone must be one of {', '.join(list_models())}, got {self.backbone!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeepLabConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DeepLabConfig option(s): {', '.join(unknown)}")
        return cls(**values)


# From this dilation on, the atrous depthwise convs of ASPP run as a sum of shifted products on
# channels-last CPU tensors: oneDNN's depthwise conv drops to a slow path there (2048 channels of
# 32x32 on 2 AVX2 cores: 1.4-2.4 ms at dilation 1-4, 49-78 ms at 6-18), while the sum takes 18-30
# ms eager and 3-6 ms compiled by Inductor, which fuses it into one loop. On NCHW tensors (training)
# the sum is taken only where whole rows or columns of taps read padding (dilation >= the map's
# side: ASPP at small crops): then it is one to three products instead of the slow conv.
_SHIFTED_FROM_DILATION = 5


def atrous_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3 depthwise conv padded by its dilation (same size out). On a CPU, it is
    computed as the sum over the nine taps of the zero-padded input shifted by the tap, times the
    tap's weight, with the taps that see only padding left out (and that padding never made):
    for channels-last input from dilation 5 on, for NCHW input (eager) where the dilation reaches
    the map's height or width. The same function, exact up to the order of the float additions."""
    rate = conv.dilation[0]
    if (x.device.type != "cpu" or conv.kernel_size != (3, 3) or conv.dilation != (rate, rate)
            or conv.padding != conv.dilation or conv.groups != x.shape[1] or conv.stride != (1, 1)):
        return conv(x)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        if rate < _SHIFTED_FROM_DILATION:
            return conv(x)
    elif torch.compiler.is_compiling() or (rate < x.shape[-2] and rate < x.shape[-1]):
        return conv(x)  # NCHW: all nine taps see the image (and export keeps its dynamic sides)
    height, width = x.shape[-2:]
    rows = (1,) if rate >= height else (0, 1, 2)  # the other rows of taps would read padding only
    cols = (1,) if rate >= width else (0, 1, 2)
    pad_h, pad_w = (rate if len(rows) == 3 else 0), (rate if len(cols) == 3 else 0)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
    weight = conv.weight[:, 0]  # (C, 3, 3)
    out = None
    for i in rows:
        top = i * pad_h  # the tap's row offset into the padded map (0: the centre, unpadded)
        for j in cols:
            left = j * pad_w
            tap = padded[:, :, top:top + height, left:left + width] * weight[:, i, j, None, None]
            out = tap if out is None else out + tap
    if conv.bias is not None:
        out = out + conv.bias[:, None, None]
    return out  # (B, C, H, W)


class HeadSeparableConv(nn.Module):
    """Depthwise 3x3 conv dilated by ``rate``, [BN, ReLU,] pointwise 1x1 conv, BN, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, rate: int, *, bn_eps: float, depthwise_bn: bool) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, 1, rate, rate, groups=in_chs, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_chs, eps=bn_eps) if depthwise_bn else None
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(out_chs, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = atrous_depthwise(self.conv_dw, x)  # (B, C_in, H, W)
        if self.bn_dw is not None:
            x = F.relu(self.bn_dw(x))
        return F.relu(self.bn_pw(self.conv_pw(x)))  # (B, C_out, H, W)


class ASPP(nn.Module):
    """Image pooling, 1x1 conv and three atrous separable convs, concatenated in that order
    (the order TensorFlow DeepLab's ``concat_projection`` weights expect), projected by a 1x1 conv."""

    def __init__(self, in_chs: int, channels: int, rates: tuple[int, ...], *, bn_eps: float,
                 depthwise_bn: bool) -> None:
        super().__init__()
        self.pool = ConvBn(in_chs, channels, 1, 1, bn_eps=bn_eps, act=True)
        self.conv0 = ConvBn(in_chs, channels, 1, 1, bn_eps=bn_eps, act=True)
        self.atrous = nn.ModuleList(HeadSeparableConv(in_chs, channels, r, bn_eps=bn_eps, depthwise_bn=depthwise_bn)
                                    for r in rates)
        self.project = ConvBn(channels * (2 + len(rates)), channels, 1, 1, bn_eps=bn_eps, act=True)

    def set_rates(self, rates: tuple[int, ...]) -> None:
        for conv, rate in zip(self.atrous, rates):
            conv.conv_dw.dilation = (rate, rate)
            conv.conv_dw.padding = (rate, rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))  # (B, 256, 1, 1)
        branches = [pooled.expand(-1, -1, size[0], size[1]), self.conv0(x)]  # a 1x1 map resizes to a constant
        branches += [conv(x) for conv in self.atrous]  # (B, 256, H, W) each
        return self.project(torch.cat(branches, dim=1))  # (B, 256, H, W)


class Decoder(nn.Module):
    """Low-level features projected to 48 channels, concatenated after the upsampled ASPP output,
    two 3x3 separable convs."""

    def __init__(self, aspp_chs: int, low_chs: int, low_proj: int, channels: int, *, bn_eps: float,
                 depthwise_bn: bool) -> None:
        super().__init__()
        self.project = ConvBn(low_chs, low_proj, 1, 1, bn_eps=bn_eps, act=True)
        self.conv0 = HeadSeparableConv(aspp_chs + low_proj, channels, 1, bn_eps=bn_eps, depthwise_bn=depthwise_bn)
        self.conv1 = HeadSeparableConv(channels, channels, 1, bn_eps=bn_eps, depthwise_bn=depthwise_bn)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)  # (B, 256, H/4, W/4)
        x = torch.cat([x, self.project(low)], dim=1)  # (B, 256 + 48, H/4, W/4)
        return self.conv1(self.conv0(x))  # (B, 256, H/4, W/4)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+: ``forward(images)`` -> (B, num_classes, H, W) logits at the input's size.

    Build it from a :class:`DeepLabConfig` or its fields: ``DeepLabV3Plus(backbone="xception65",
    num_classes=21, output_stride=16)``. The encoder is ``self.encoder``, a registered model whose
    ImageNet weights load with :func:`~xception.load_weights` (``strict=False``: it has no classifier).
    """

    def __init__(self, config: DeepLabConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = DeepLabConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.num_classes = config.num_classes
        self.grad_checkpointing = False
        self.encoder = build_model(config.backbone, **self._encoder_kwargs(config))
        self.encoder.model_name = config.backbone
        # The stride-4 features: in the aligned models, the second separable conv of the block that
        # reduces 4 -> 8 (DeepLab's ``entry_flow/block2/unit_1/.../separable_conv2_pointwise`` for 65);
        # elsewhere the backbone's reduction-4 feature tap.
        reductions = [info["reduction"] for info in self.encoder.feature_info]
        if 4 not in reductions:
            raise ValueError(f"{config.backbone} has no feature map at stride 4 for the decoder")
        self.low_level_tap = reductions.index(4)
        self.low_level_block = self.encoder.feature_taps[self.low_level_tap]
        self.reads_conv2 = isinstance(self.encoder, AlignedXception)
        if self.reads_conv2:
            low_chs = self.encoder.blocks[self.low_level_block].stack.conv2.conv_pw.out_channels
        else:
            low_chs = self.encoder.feature_info[self.low_level_tap]["num_chs"]
        head = {"bn_eps": config.head_bn_eps, "depthwise_bn": config.head_depthwise_bn}
        self.aspp = ASPP(self.encoder.num_features, config.aspp_channels, self.aspp_rates(config.output_stride),
                         **head)
        self.decoder = Decoder(config.aspp_channels, low_chs, config.low_level_channels, config.decoder_channels,
                               **head)
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_classes, 1)
        self._init_head()

    @staticmethod
    def _encoder_kwargs(config: DeepLabConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {**config.encoder_options, "num_classes": 0, "in_chans": config.in_chans,
                                  "output_stride": config.output_stride}
        if config.encoder_bn_eps is not None:
            kwargs["bn_eps"] = config.encoder_bn_eps
        return kwargs

    @staticmethod
    def aspp_rates(output_stride: int) -> tuple[int, ...]:
        return tuple(r * 16 // output_stride for r in ASPP_RATES)

    def _init_head(self) -> None:
        for module in (self.aspp, self.decoder, self.classifier):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        # Not TensorFlow DeepLab's N(0, 0.01): logits that small scale the head's gradients by 0.01 and,
        # with a random head, it learns several times slower (benchmarks/README.md, DeepLabv3+).
        nn.init.xavier_uniform_(self.classifier.weight)

    # -- options that change after building -------------------------------------------------------

    @torch.jit.ignore
    def set_output_stride(self, output_stride: int) -> None:
        """Re-dilate encoder and ASPP for ``output_stride`` (16 or 8), keeping every parameter object
        (an optimizer built before still holds them)."""
        config = dataclasses.replace(self.config, output_stride=output_stride)  # validates
        encoder_config = dataclasses.replace(self.encoder.config, output_stride=output_stride)
        target = build_model(config.backbone, **dataclasses.asdict(encoder_config))  # its layout only
        for name, module in target.named_modules():
            current = self.encoder.get_submodule(name) if name else self.encoder
            if isinstance(module, nn.Conv2d):
                current.stride, current.padding, current.dilation = module.stride, module.padding, module.dilation
            elif isinstance(module, nn.MaxPool2d):  # no tensors: the new pool (its class may differ) replaces it
                self.encoder.set_submodule(name, module)
        self.encoder.config = target.config
        self.encoder.feature_info = target.feature_info
        self.aspp.set_rates(self.aspp_rates(output_stride))
        self.config = config

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    # -- forwards ----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, low_level)``: (B, 2048, H/os, W/os) and the (B, C, ~H/4, ~W/4) decoder input."""
        enc = self.encoder
        if not self.reads_conv2:
            features, maps = enc.forward_intermediates(x, indices=[self.low_level_tap])
            return features, maps[0]
        x = check_images(x, enc.in_chans, enc.min_input_size)
        x = enc.stem(x)  # (B, 64, H/2, W/2)
        low = x
        for i, block in enumerate(enc.blocks):
            if i == self.low_level_block:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x, low = checkpoint_module(block, x, fn=block.forward_with_conv2)
                else:
                    x, low = block.forward_with_conv2(x)
            else:
                x = enc.run_block(block, x)
        return enc._final_act(enc.exit_tail(x)), low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features, low = self.encode(x)
        y = self.aspp(features)  # (B, 256, H/os, W/os)
        y = F.dropout(y, self.config.dropout, self.training)
        y = self.decoder(y, low)  # (B, 256, H/4, W/4)
        y = self.classifier(y)  # (B, num_classes, H/4, W/4)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=True)  # (B, num_classes, H, W)
