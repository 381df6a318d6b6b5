"""Dynamic int8 (no calibration data; fast where the CPU has int8 dot products, VNNI / AMX).

Xception's 1x1 convolutions hold about 7.8 of its 8.4 GMACs. On a CPU with AVX-512 VNNI an
int8 x int8 -> int32 matrix product runs about twice as fast as the same product in bf16, so
:func:`quantize_pointwise` swaps those convs for :class:`Int8PointwiseConv`:

* weights: symmetric int8 per output channel (scale = max |w| / 127), computed once;
* activations: symmetric int8 per pixel, scales computed on every call (dynamic quantization:
  no calibration data, and nothing depends on inputs seen before);
* ``y = int_mm(q_x, q_w) * s_pixel * s_channel + bias``, returned in the input's dtype.

Everything else (stem, depthwise convs, pools, head) stays in the model's floating dtype. Under
``torch.compile`` the per-pixel quantization and the rescale fuse with the neighbouring ReLU,
residual add and dtype casts. Convs with few input channels stay in floating point: their
products are cheap and the int32 output would cost more memory traffic than the int8 saves.
"""

from __future__ import annotations

import torch
from torch import nn

# Below this many input channels a 1x1 conv stays in floating point (measured on the 2-core
# EPYC, bf16 rest, compiled: threshold 0 -> 23.0, 128 -> 23.8, 256 -> 23.6, none -> 19.9 img/s).
MIN_IN_CHANNELS = 128


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D tensor: ``(q, scale)`` with ``x ~= q * scale``."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # (M, 1)
    q = torch.round(x * (127.0 / amax)).to(torch.int8)
    return q, amax * (1.0 / 127.0)


class Int8PointwiseConv(nn.Module):
    """A 1x1 convolution (any stride, groups 1, no padding) with int8 weights and activations."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_pointwise(conv):
            raise ValueError(f"Int8PointwiseConv takes a 1x1 conv with groups 1 and no padding, got {conv}")
        w = conv.weight.detach().double().flatten(1)  # (O, C)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (O,)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride = conv.stride
        # (C, O) int8: the right operand of the (pixels, C) x (C, O) product
        self.register_buffer("weight_q", torch.round(w / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale.float())
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse=True):
        # A model-wide cast (model.to(torch.bfloat16)) moves the scales and bias but keeps them
        # fp32: rounding them to bf16 would add a per-channel error on top of the int8 one.
        kept = {k: self._buffers[k] for k in ("weight_scale", "bias")}
        super()._apply(fn, recurse)
        for k, v in kept.items():
            self._buffers[k] = v.to(self._buffers[k].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[:, :, ::sh, ::sw]
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c).float()  # (B*H*W, C); a view if channels-last
        q, row_scale = quantize_per_row(rows)
        acc = torch._int_mm(q, self.weight_q)  # (B*H*W, O) int32
        y = acc.float() * row_scale * self.weight_scale + self.bias
        return y.to(x.dtype).view(b, h, w, self.out_channels).permute(0, 3, 1, 2)  # (B, O, H, W) channels-last

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


@torch.no_grad()
def quantize_pointwise(model: nn.Module, *, min_in_channels: int = MIN_IN_CHANNELS) -> int:
    """Replace (in place) every 1x1 conv with at least ``min_in_channels`` inputs by an
    :class:`Int8PointwiseConv`; returns how many were replaced. Fold batch norms first
    (:func:`~xception.deploy.folding.fold_batchnorms`) so the folded scale is quantized with the weight.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and is_pointwise(m) and m.in_channels >= min_in_channels]
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8PointwiseConv(conv))
    return len(targets)
