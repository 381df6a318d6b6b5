"""Pure-PyTorch versions of the fused kernels: the reference they are tested against, and the
fallback where Triton or CUDA is missing.

Layout conventions shared with the Triton kernels (see :mod:`.triton_kernels`):

* activations are ``(B, C, H, W)`` tensors, any memory format (channels-last is fastest);
* ``dw_weight`` is the depthwise kernel, ``(C, 1, k, k)``; ``dw_bias`` is ``(C,)`` or ``None``;
* ``pw_weight`` is the pointwise kernel transposed to ``(C_in, C_out)`` (K-major, what the
  matrix units want); ``bias`` is ``(C_out,)`` (a folded batch norm) or ``None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MID_ACTIVATIONS = ("none", "relu", "elu")


def _mid(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "elu":
        return F.elu(x)
    if name != "none":
        raise ValueError(f"activation must be one of {MID_ACTIVATIONS}, got {name!r}")
    return x


def separable_conv_reference(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    pw_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dw_bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    relu_in: bool = False,
    mid_activation: str = "none",
    relu_out: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu_out(pointwise(mid(depthwise(relu_in(x)))) + bias + residual)``, computed in fp32."""
    dtype = x.dtype
    h = F.relu(x) if relu_in else x
    h = F.conv2d(h.float(), dw_weight.float(), None if dw_bias is None else dw_bias.float(),
                 stride, padding, dilation, groups=x.shape[1])
    h = _mid(h, mid_activation)
    # The Triton kernel rounds the depthwise result to the operand dtype before the matrix product.
    h = h.to(dtype).float()
    w = pw_weight.float().t()[:, :, None, None]  # (C_out, C_in, 1, 1)
    out = F.conv2d(h, w, None if bias is None else bias.float())
    if residual is not None:
        out = out + residual.float()
    if relu_out:
        out = F.relu(out)
    return out.to(dtype)


def pool_output_size(size: int, *, stride: int, dilation: int, padding: str | int) -> tuple[int, int]:
    """(output size, padding before) of a 3x3 max-pool; ``padding`` is an int or ``"same"``."""
    span = 2 * dilation + 1
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + span - size, 0)
        return out, total // 2
    out = (size + 2 * padding - span) // stride + 1
    return out, padding


def max_pool_add_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    stride: int = 2,
    dilation: int = 1,
    padding: str | int = 1,
    skip_input: torch.Tensor | None = None,
    skip_weight: torch.Tensor | None = None,
    skip_bias: torch.Tensor | None = None,
    skip_stride: int = 2,
) -> torch.Tensor:
    """``max_pool3x3(x) + residual``, where the residual is given, or is a 1x1 strided conv of
    ``skip_input`` (``skip_weight`` ``(C_in, C_out)``, ``skip_bias`` ``(C_out,)``), or absent.

    ``padding`` is an int (symmetric, like ``nn.MaxPool2d``) or ``"same"`` (TensorFlow: the extra
    pixel after); padded pixels are ``-inf`` and never win.
    """
    dtype = x.dtype
    xf = x.float()
    if padding == "same":
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            out, before = pool_output_size(size, stride=stride, dilation=dilation, padding="same")
            total = max((out - 1) * stride + 2 * dilation + 1 - size, 0)
            pads += [before, total - before]
        out = F.max_pool2d(F.pad(xf, pads, value=float("-inf")), 3, stride, 0, dilation)
    else:
        out = F.max_pool2d(xf, 3, stride, padding, dilation)
    if skip_weight is not None:
        if skip_input is None:
            raise ValueError("skip_weight needs skip_input")
        w = skip_weight.float().t()[:, :, None, None]
        residual = F.conv2d(skip_input.float(), w, None if skip_bias is None else skip_bias.float(), skip_stride)
    if residual is not None:
        if residual.shape != out.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from the pooled {tuple(out.shape)}")
        out = out + residual.float()
    return out.to(dtype)
