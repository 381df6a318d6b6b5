"""Layers shared by the model families: input check, pooling, drop path, conv + BN, checkpointing.

Every function a model's ``forward`` calls here is scriptable by TorchScript and traceable by
``torch.fx``, ``torch.export`` and ``torch.compile``. The two that read tensor shapes in Python
control flow (:func:`check_images`, :func:`same_pads`) are left whole by FX (``torch.fx.wrap`` in
the modules that call them): FX records one call instead of tracing into the branches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _shape_str(shape: list[int]) -> str:
    """``(3, 32, 32)``, as ``tuple(shape)`` prints, in a form TorchScript compiles."""
    body = ", ".join([str(s) for s in shape])
    return "(" + body + ",)" if len(shape) == 1 else "(" + body + ")"


def check_images(x: torch.Tensor, in_chans: int, min_size: int = 1) -> torch.Tensor:
    """``x`` itself if it is a (B, in_chans, H, W) batch with H, W >= min_size; else a ValueError.

    Returns its input so that the check stays in traced graphs (an FX node nothing reads is dead code).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {_shape_str(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {_shape_str(x.shape)})")
    if min(x.shape[-2], x.shape[-1]) < min_size:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small for Xception: the minimum "
                         f"is {min_size}x{min_size}")
    return x


def same_pads(height: int, width: int, kernel_size: int, stride: int, dilation: int) -> list[int]:
    """``F.pad`` amounts (last dim first) for TensorFlow 'same' pooling: the extra pixel goes after."""
    pads: list[int] = []
    for size in (width, height):
        out = -(-size // stride)  # ceil
        total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


torch.fx.wrap("same_pads")


class MaxPool2dSame(nn.MaxPool2d):
    """Max-pool with TensorFlow 'same' padding: -inf padding, the extra pixel after, not before."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__(kernel_size, stride, padding=0, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pads(x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.dilation)
        x = F.pad(x, pads, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation)  # (B, C, ceil(H/s), ceil(W/s))


def max_pool(stride: int, dilation: int, padding_mode: str) -> nn.MaxPool2d:
    """The 3x3 max-pool that ends a strided block.

    A dilated pool (a stride turned into dilation by ``output_stride``, always at stride 1) pads
    with -inf explicitly: ``nn.MaxPool2d`` refuses padding > kernel_size // 2. At stride 1 the
    'same' padding is symmetric, so both padding modes agree there.
    """
    if padding_mode == "same" or dilation > 1:
        return MaxPool2dSame(3, stride, dilation)
    return nn.MaxPool2d(3, stride, padding=dilation, dilation=dilation)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def global_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): ``"max"`` or ``"avg"`` over the spatial dims."""
    return torch.amax(x, dim=[2, 3]) if pool_type == "max" else torch.mean(x, dim=[2, 3])


class ConvBn(nn.Module):
    """Conv (no bias, 'same'-size symmetric padding), BatchNorm, optional ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, *, bn_eps: float,
                 act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # (B, C_out, H/stride, W/stride)
        return F.relu(x) if self.act else x


def checkpoint_module(module: nn.Module, *args: torch.Tensor, fn: Callable[..., Any] | None = None) -> Any:
    """``fn(*args)`` (default ``module(*args)``) with activation checkpointing: stored inputs only,
    recomputed in backward.

    The recomputation leaves the batch-norm running statistics of ``module`` alone, so one training
    step updates them exactly once, as without checkpointing. Random ops (drop path) replay the
    same draws (``checkpoint`` restores the RNG state), so gradients equal the plain model's.
    """
    contexts = lambda: (contextlib.nullcontext(), _FrozenBatchStats(module))  # noqa: E731
    return checkpoint(module if fn is None else fn, *args, use_reentrant=False, context_fn=contexts)


class _FrozenBatchStats:
    """While active, the batch norms of ``module`` leave their running statistics untouched.

    Gradient checkpointing re-runs a block in the backward pass; without this its batch norms
    would update their running statistics a second time.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> _FrozenBatchStats:
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
