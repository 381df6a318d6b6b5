"""Xception (Chollet, CVPR 2017), module for module as the seed tutorial builds it.

The module names and their order are the seed's, so ``state_dict()`` keys equal those of the
seed's printed tree, of timm's ``legacy_xception`` and of Cadene's weight file:

    conv1 bn1 relu conv2 bn2              entry stem: two plain 3x3 convs, no padding
    block1 block2 block3                  entry flow: 128, 256, 728 channels, each halving H, W
    block4 ... block11                    middle flow: 8 identical residual blocks at 728
    block12 conv3 bn3 conv4 bn4           exit flow: 1024, then separable convs to 1536, 2048
    fc                                    classifier after global pooling
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import XceptionConfig
from .features import feature_take_indices
from .registry import register_model


class MaxPool2dSame(nn.MaxPool2d):
    """Max-pool with TensorFlow 'same' padding: -inf padding, the extra pixel after, not before."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__(kernel_size, stride, padding=0, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
            out = -(-size // self.stride)  # ceil
            total = max((out - 1) * self.stride + (self.kernel_size - 1) * self.dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads, value=float("-inf")))


def max_pool(stride: int, dilation: int, padding_mode: str) -> nn.MaxPool2d:
    """The 3x3 max-pool that ends a strided block.

    A dilated pool (a stride turned into dilation by ``output_stride``, always at stride 1) pads
    with -inf explicitly: ``nn.MaxPool2d`` refuses padding > kernel_size // 2. At stride 1 the
    'same' padding is symmetric, so both padding modes agree there.
    """
    if padding_mode == "same" or dilation > 1:
        return MaxPool2dSame(3, stride, dilation)
    return nn.MaxPool2d(3, stride, padding=dilation, dilation=dilation)


def _activation(name: str) -> nn.Module | None:
    return {"none": None, "relu": nn.ReLU(), "elu": nn.ELU()}[name]


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def check_images(x: torch.Tensor, in_chans: int, min_size: int = 1) -> None:
    """Raise a ValueError naming the problem unless ``x`` is a (B, in_chans, H, W) batch >= min_size."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small for Xception: the minimum "
                         f"is {min_size}x{min_size}")


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

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.rep(inp)
        if not self.residual:
            return x
        skip = inp if self.skip is None else self.skipbn(self.skip(inp))
        return drop_path(x, self.drop_path, self.training) + skip


class Xception(nn.Module):
    """Xception with the seed's module names. Build it from an :class:`XceptionConfig`.

    ``forward(x)`` = ``forward_head(forward_features(x))``. ``forward_features`` returns the last
    feature map after the final ReLU (what Keras returns with ``include_top=False``).
    """

    def __init__(self, config: XceptionConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = XceptionConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = 2048
        self.grad_checkpointing = False
        c = config
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
        # output, then the outputs of block1, block2 and the last middle block, each after the ReLU
        # that opens the next block (whose closing pool is the next downsampling), and the final
        # feature map. `module` names the layer whose output is tapped (bn2/bn4: after the ReLU).
        n = len(specs)
        self._feature_ends = (0, 1, 2, n - 1, n)  # blocks run before each tap
        self.feature_info: list[dict] = [dict(num_chs=64, reduction=2, module="bn2")]
        for end in self._feature_ends[1:-1]:
            self.feature_info.append(dict(num_chs=specs[end - 1][1], reduction=block_strides[end - 1],
                                          module=f"{self.block_names[end]}.rep.0"))
        self.feature_info.append(dict(num_chs=self.num_features, reduction=stride, module="bn4"))

        # Exit flow tail
        act = c.intermediate_activation
        self.conv3 = SeparableConv2d(1024, 1536, 3, 1, dilation, dilation, activation=act)
        self.bn3 = nn.BatchNorm2d(1536, eps=c.bn_eps)
        self.conv4 = SeparableConv2d(1536, 2048, 3, 1, dilation, dilation, activation=act)
        self.bn4 = nn.BatchNorm2d(2048, eps=c.bn_eps)
        self.fc = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()

        self._init_weights()

    def _init_weights(self) -> None:
        # The seed's initialisation: He-normal over k*k*out_channels for every conv, BN = identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """Smallest input side the network reduces: both stem convs are unpadded 3x3."""
        return 7

    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_chans, self.min_input_size)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0 removes it)."""
        changes = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = dataclasses.replace(self.config, **changes)
        self.num_classes = num_classes
        device = self.bn4.weight.device
        self.fc = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 32, H/2, W/2)
        return self.relu(self.bn2(self.conv2(x)))  # (B, 64, H/2 - 2, W/2 - 2)

    def blocks(self) -> list[Block]:
        return [getattr(self, name) for name in self.block_names]

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_module(block, x)
        return block(x)

    def exit_tail(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn3(self.conv3(x)))  # (B, 1536, H/32, W/32)
        return self.relu(self.bn4(self.conv4(x)))  # (B, 2048, H/32, W/32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        for block in self.blocks():
            x = self.run_block(block, x)  # 728 channels at H/16 through the middle flow
        return self.exit_tail(x)

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

        Args:
            x: (B, in_chans, H, W) images.
            indices: taps to return: ``None`` all five, an int ``n`` the last ``n``, or a sequence
                of tap indices (0: stem at reduction 2 ... 4: final map at 32; see ``feature_info``).
            norm: accepted for timm compatibility; Xception has no final norm to apply.
            stop_early: stop after the deepest requested tap.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of maps.

        Returns:
            ``(features, maps)``, or ``maps`` if ``intermediates_only``. ``features`` is what
            ``forward_features`` returns, or with ``stop_early`` the activated map at the last tap.
            ``maps`` are (B, num_chs, ~H / reduction, ~W / reduction) tensors in tap order (the
            unpadded stem convs trim a few pixels: 64 -> 29, 15, 8, 4, 2).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        last = len(self.feature_info) - 1
        self._check_input(x)
        maps = []
        x = self.stem(x)  # tap 0, already activated
        if 0 in take:
            maps.append(x)
        blocks = self.blocks()
        num_blocks = self._feature_ends[max_index] if stop_early else len(blocks)
        for i, block in enumerate(blocks[:num_blocks], start=1):
            x = self.run_block(block, x)
            if i in self._feature_ends[1:last]:
                tap = self._feature_ends.index(i)
                if tap in take:
                    maps.append(F.relu(x))  # the ReLU that opens the next block
        if num_blocks == len(blocks):
            x = self.exit_tail(x)
            if last in take:
                maps.append(x)
        elif num_blocks > 0:
            x = F.relu(x)
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.config.global_pool == "max":
            x = torch.amax(x, dim=(2, 3))  # (B, 2048)
        else:
            x = torch.mean(x, dim=(2, 3))  # (B, 2048)
        x = F.dropout(x, self.config.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_module(module: nn.Module, *args: torch.Tensor):
    """``module(*args)`` with activation checkpointing: stored inputs only, recomputed in backward.

    The recomputation leaves the batch-norm running statistics alone, so one training step
    updates them exactly once, as without checkpointing. Random ops (drop path) replay the same
    draws (``checkpoint`` restores the RNG state), so gradients equal the plain model's.
    """
    contexts = lambda: (contextlib.nullcontext(), _FrozenBatchStats(module))  # noqa: E731
    return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)


class _FrozenBatchStats:
    """While active, the batch norms of ``module`` leave their running statistics untouched.

    Gradient checkpointing re-runs a block in the backward pass; without this its batch norms
    would update their running statistics a second time.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> "_FrozenBatchStats":
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@register_model
def xception(**kwargs) -> Xception:
    """The seed's Xception: 22,855,952 parameters at 1000 classes. ``kwargs``: :class:`XceptionConfig`."""
    return Xception(XceptionConfig(**kwargs))
