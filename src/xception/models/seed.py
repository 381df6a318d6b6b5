"""Xception (Chollet, CVPR 2017), module for module as the seed tutorial builds it.

The module names and their order are the seed's, so ``state_dict()`` keys equal those of the
seed's printed tree, of timm's ``legacy_xception`` and of Cadene's weight file:

    conv1 bn1 relu conv2 bn2              entry stem: two plain 3x3 convs, no padding
    block1 block2 block3                  entry flow: 128, 256, 728 channels, each halving H, W
    block4 ... block11                    middle flow: 8 identical residual blocks at 728
    block12 conv3 bn3 conv4 bn4           exit flow: 1024, then separable convs to 1536, 2048
    fc                                    classifier after global pooling

In the interface of :class:`~xception.models.base.XceptionBase`, ``stem`` is a method (conv1 ...
the second ReLU) and ``blocks`` a tuple of block1 ... blockN: the seed's tree has no containers.
TorchScript cannot loop over attributes, so ``torch.jit.script`` compiles a twin that holds the
same blocks in one ``nn.ModuleList`` (``__prepare_scriptable__``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from .base import STEM, XceptionBase
from .config import XceptionConfig
from .layers import drop_path, max_pool
from .registry import register_model


def _activation(name: str) -> nn.Module | None:
    return {"none": None, "relu": nn.ReLU(), "elu": nn.ELU()}[name]


class SeparableConv2d(nn.Module):
    """Depthwise ``kernel_size`` conv (``conv1``), then pointwise 1x1 conv (``pointwise``).

    No nonlinearity between the two unless ``activation`` asks for one (the paper's Figure 10).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = False,
        activation: str = "none",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels, bias=bias
        )
        self.act = _activation(activation)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, C_in, H, W)
        if self.act is not None:
            x = self.act(x)
        return self.pointwise(x)  # (B, C_out, H, W)


class Block(nn.Module):
    """``reps`` x (ReLU, SeparableConv2d 3x3, BatchNorm), a 3x3 max-pool if strided, plus a residual.

    Args:
        in_filters, out_filters: channels in and out.
        reps: number of separable convs.
        strides: stride of the closing max-pool (and of the 1x1 conv on the residual path).
        start_with_relu: begin with a ReLU (all blocks but the first).
        grow_first: change the channel count in the first separable conv rather than the last.
        dilation: dilation of the separable convs; ``pool_dilation`` that of the max-pool.
    """

    def __init__(
        self,
        in_filters: int,
        out_filters: int,
        reps: int,
        strides: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
        *,
        dilation: int = 1,
        pool_dilation: int = 1,
        pool_stride: int | None = None,
        activation: str = "none",
        residual: bool = True,
        bn_eps: float = 1e-5,
        pool_padding: str = "torch",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # `strides` is the block's nominal stride (it decides whether a projection is needed);
        # `pool_stride` is what the pool really uses (1 when output_stride turned it into dilation).
        pool_stride = strides if pool_stride is None else pool_stride
        if residual and (out_filters != in_filters or strides != 1):
            self.skip = nn.Conv2d(in_filters, out_filters, 1, stride=pool_stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_filters, eps=bn_eps)
        else:
            self.skip = None
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.drop_path = drop_path

        if grow_first:
            channels = [(in_filters, out_filters)] + [(out_filters, out_filters)] * (reps - 1)
        else:
            channels = [(in_filters, in_filters)] * (reps - 1) + [(in_filters, out_filters)]
        rep: list[nn.Module] = []
        for i, (cin, cout) in enumerate(channels):
            if i > 0:
                rep.append(self.relu)
            elif start_with_relu:
                rep.append(nn.ReLU(inplace=False))  # the block input is still needed by the residual
            rep.append(SeparableConv2d(cin, cout, 3, 1, dilation, dilation, activation=activation))
            rep.append(nn.BatchNorm2d(cout, eps=bn_eps))
        if strides != 1:
            rep.append(max_pool(pool_stride, pool_dilation, pool_padding))
        self.rep = nn.Sequential(*rep)

    def forward_with_tap(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, tap)``: ``tap`` is the output of ``rep[0]``, the ReLU that opens the block."""
        x = inp  # (B, C_in, H, W)
        tap = inp
        for i, layer in enumerate(self.rep):
            x = layer(x)
            if i == 0:
                tap = x
        if self.residual:
            skip = inp if self.skip is None else self.skipbn(self.skip(inp))
            x = drop_path(x, self.drop_path, self.training) + skip
        return x, tap  # (B, C_out, H/stride, W/stride), (B, C_in or C_out, H, W)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(inp)[0]


class Xception(XceptionBase):
    """Xception with the seed's module names. Build it from an :class:`XceptionConfig`.

    ``forward(x)`` = ``forward_head(forward_features(x))``. ``forward_features`` returns the last
    feature map after the final ReLU (what Keras returns with ``include_top=False``). Inputs must
    be at least 7x7 (``min_input_size``): both stem convs are unpadded 3x3.
    """

    config_class = XceptionConfig
    classifier_name = "fc"
    __jit_unused_properties__ = ["blocks"]  # the scriptable twin holds them in a ModuleList

    def __init__(self, config: XceptionConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.min_input_size = 7
        opts = dict(activation=c.intermediate_activation, residual=c.residual, bn_eps=c.bn_eps,
                    pool_padding=c.pool_padding)

        # Entry flow stem: (B, in_chans, H, W) -> (B, 64, (H-3)//2 - 1, ...)
        self.conv1 = nn.Conv2d(c.in_chans, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32, eps=c.bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(64, eps=c.bn_eps)

        # (in, out, reps, stride, start_with_relu, grow_first) for entry, middle and exit flow.
        specs = [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
        specs += [(728, 728, 3, 1, True, True)] * c.middle_blocks
        specs += [(728, 1024, 2, 2, True, False)]
        drop_rates = torch.linspace(0, c.drop_path_rate, len(specs)).tolist()
        stride, dilation = 2, 1  # after conv1
        self.block_names: tuple[str, ...] = tuple(f"block{i + 1}" for i in range(len(specs)))
        block_strides = []  # reduction after each block, capped at output_stride
        for name, spec, dpr in zip(self.block_names, specs, drop_rates):
            # A block whose stride would exceed output_stride pools with stride 1 (its 1x1 skip conv
            # too) at its own dilation; the layers after it see the stride as extra dilation.
            block_dilation = dilation
            pool_stride = spec[3]
            if spec[3] != 1 and stride * spec[3] > c.output_stride:
                dilation *= spec[3]
                pool_stride = 1
            else:
                stride *= spec[3]
            block = Block(*spec, dilation=block_dilation, pool_dilation=block_dilation,
                          pool_stride=pool_stride, drop_path=dpr, **opts)
            setattr(self, name, block)
            block_strides.append(stride)

        # Feature taps, one per reduction 2, 4, 8, 16, 32 (timm's legacy_xception taps): the stem
        # output; the opening ReLU (rep.0) of block2, block3 and the exit block, i.e. the activated
        # outputs of block1, block2 and the last middle block; the final feature map. The stem and
        # final taps are the 2nd and 4th call of the shared `relu` module: FX names them relu_1, relu_3.
        n = len(specs)
        self.feature_taps = [STEM, 1, 2, n - 1, n]
        self.feature_info = [dict(num_chs=64, reduction=2, module="relu_1")]
        for k in self.feature_taps[1:-1]:
            self.feature_info.append(dict(num_chs=specs[k - 1][1], reduction=block_strides[k - 1],
                                          module=f"{self.block_names[k]}.rep.0"))
        self.feature_info.append(dict(num_chs=self.num_features, reduction=stride, module="relu_3"))

        # Exit flow tail
        act = c.intermediate_activation
        self.conv3 = SeparableConv2d(1024, 1536, 3, 1, dilation, dilation, activation=act)
        self.bn3 = nn.BatchNorm2d(1536, eps=c.bn_eps)
        self.conv4 = SeparableConv2d(1536, 2048, 3, 1, dilation, dilation, activation=act)
        self.bn4 = nn.BatchNorm2d(2048, eps=c.bn_eps)
        self.fc = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()

        self._init_weights()

    @property
    def blocks(self) -> tuple[Block, ...]:
        """block1 ... blockN, in order."""
        return tuple(getattr(self, name) for name in self.block_names)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 32, (H-3)//2 + 1, ...)
        return self.relu(self.bn2(self.conv2(x)))  # (B, 64, (H-3)//2 - 1, ...)

    def exit_tail(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn3(self.conv3(x)))  # (B, 1536, H/32, W/32)
        return self.relu(self.bn4(self.conv4(x)))  # (B, 2048, H/32, W/32)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (B, num_classes)

    def __prepare_scriptable__(self) -> Xception:
        """What ``torch.jit.script`` compiles: a shallow copy whose blocks sit in one ModuleList.

        It shares every module, parameter and buffer with this model; only its own module tree
        differs: ``blocks.0`` ... ``blocks.{N-1}`` in the place of block1 ... blockN.
        """
        twin = copy.copy(self)
        modules: OrderedDict[str, nn.Module | None] = OrderedDict()
        for name, module in self._modules.items():
            if name == self.block_names[0]:
                modules["blocks"] = nn.ModuleList(self.blocks)
            if name not in self.block_names:
                modules[name] = module
        twin.__dict__["_modules"] = modules
        return twin


@register_model
def xception(**kwargs) -> Xception:
    """The seed's Xception: 22,855,952 parameters at 1000 classes. ``kwargs``: :class:`XceptionConfig`."""
    return Xception(XceptionConfig(**kwargs))
