"""Triton kernels for Xception inference (channels-last activations).

* :func:`separable_conv` — depthwise kxk (any stride, padding, dilation) + pointwise 1x1 on the
  matrix units in one pass: the depthwise result of a (pixels x channels) tile stays in registers
  and is fed straight to ``tl.dot``; the epilogue adds the folded batch-norm bias, an optional
  residual and the ReLU. The ReLU before the conv is applied on load, the optional activation
  between depthwise and pointwise in registers.
* :func:`max_pool_add` — 3x3 max-pool (torch or TensorFlow 'same' padding, -inf padding,
  stride, dilation) + residual add, where the residual is a given tensor or the block's 1x1
  strided skip conv (with its folded batch norm), computed by the same program.

Importing this module needs Triton; :mod:`xception.inference.kernels` decides whether to use it. On a CPU
the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite
checks them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import MID_ACTIVATIONS, pool_output_size

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_DOT: tl.constexpr = tl.constexpr(INTERPRET)
_MID_CODES = {name: i for i, name in enumerate(MID_ACTIVATIONS)}


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. fp32 operands in full fp32 (not tf32). Under the interpreter, 16-bit operands
    are widened first (its bf16 dot is broken); the products are exact either way."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERPRET_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _output_pixels(pid_m, B, OH, OW, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M output pixels (rows of the B*OH*OW x C channels-last view):
    row index, in-range mask, and the (batch, row, column) of each."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rem = offs_m % (OH * OW)
    return offs_m, offs_m < B * OH * OW, offs_m // (OH * OW), rem // OW, rem % OW


@triton.jit
def _separable_conv_kernel(
    x_ptr, dw_ptr, dwb_ptr, pw_ptr, bias_ptr, res_ptr, out_ptr,
    B, H, W, C, OH, OW, N,
    sxb, sxh, sxw, sxc,
    srb, srh, srw, src,
    sob, soh, sow, soc,
    stride, pad, dil,
    KS: tl.constexpr, RELU_IN: tl.constexpr, MID: tl.constexpr, RELU_OUT: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m, mask_m, b, oh, ow = _output_pixels(pid_m, B, OH, OW, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        dw = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for kh in tl.static_range(KS):
            ih = oh * stride - pad + kh * dil
            ok_h = mask_m & (ih >= 0) & (ih < H)
            for kw in tl.static_range(KS):
                iw = ow * stride - pad + kw * dil
                ok = ok_h & (iw >= 0) & (iw < W)
                ptrs = x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + offs_k[None, :] * sxc
                v = tl.load(ptrs, mask=ok[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                if RELU_IN:
                    v = tl.maximum(v, 0.0)
                wk = tl.load(dw_ptr + offs_k * (KS * KS) + (kh * KS + kw), mask=mask_k, other=0.0)
                dw += v * wk.to(tl.float32)[None, :]
        if HAS_DW_BIAS:
            dw += tl.load(dwb_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if MID == 1:
            dw = tl.maximum(dw, 0.0)
        elif MID == 2:
            dw = tl.where(dw > 0.0, dw, tl.exp(dw) - 1.0)
        wp = tl.load(pw_ptr + offs_k[:, None] * N + offs_n[None, :],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(dw.to(wp.dtype), wp, acc, IEEE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_ptrs = res_ptr + (b * srb + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if RELU_OUT:
        acc = tl.maximum(acc, 0.0)
    o_ptrs = out_ptr + (b * sob + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_pool_add_kernel(
    x_ptr, res_ptr, sk_ptr, skw_ptr, skb_ptr, out_ptr,
    B, H, W, C, OH, OW, SKC, SKH, SKW,
    sxb, sxh, sxw, sxc,
    srb, srh, srw, src,
    skb, skh, skw, skc,
    sob, soh, sow, soc,
    stride, dil, pad_top, pad_left, skip_stride,
    HAS_RES: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_SKIP_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m, mask_m, b, oh, ow = _output_pixels(pid_m, B, OH, OW, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in tl.static_range(3):
        ih = oh * stride - pad_top + kh * dil
        ok_h = mask_m & (ih >= 0) & (ih < H)
        for kw in tl.static_range(3):
            iw = ow * stride - pad_left + kw * dil
            ok = ok_h & (iw >= 0) & (iw < W)
            ptrs = x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc
            v = tl.load(ptrs, mask=ok[:, None] & mask_c[None, :], other=float("-inf")).to(tl.float32)
            best = tl.maximum(best, v)

    mask = mask_m[:, None] & mask_c[None, :]
    if HAS_SKIP:
        # 1x1 conv with stride `skip_stride` on the block input, as a GEMM over its channels.
        base = b * skb + (oh * skip_stride) * skh + (ow * skip_stride) * skw
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, SKC, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < SKC
            a = tl.load(sk_ptr + base[:, None] + offs_k[None, :] * skc,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wgt = tl.load(skw_ptr + offs_k[:, None] * C + offs_c[None, :],
                          mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            acc = _mma(a.to(wgt.dtype), wgt, acc, IEEE)
        if HAS_SKIP_BIAS:
            acc += tl.load(skb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        best += acc
    if HAS_RES:
        r_ptrs = res_ptr + (b * srb + oh * srh + ow * srw)[:, None] + offs_c[None, :] * src
        best += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + (b * sob + oh * soh + ow * sow)[:, None] + offs_c[None, :] * soc
    tl.store(o_ptrs, best.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks_sepconv(m: int, n: int, k: int, ieee: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Small tiles under the interpreter (speed of the
    test suite). On a GPU, 64x128 output tiles with 16-channel depthwise steps and 8 warps: of
    the tilings compiled for sm_90 (``tests/triton_aot.py``) the largest whose every launch in
    the network compiles without register spills (64x128x32 with 4 warps spilled ~1 KiB per
    thread in the residual launches); chosen from the compiled code, not yet timed on a GPU.
    The fp32 (IEEE) product stages its operands in shared memory: 64x128x32 tiles need 186 KiB
    there, more than most GPUs have, so fp32 uses 32x128x16 tiles (55 KiB)."""
    if INTERPRET:
        return 16, 16, 16, 1
    override = os.environ.get("XCEPTION_SEPCONV_BLOCKS")  # "BM,BN,BK,WARPS", for tuning sweeps
    if override:
        bm, bn, bk, w = (int(v) for v in override.split(","))
        return bm, bn, bk, w
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    if ieee:
        return (32 if m >= 32 else 16), block_n, 16, 4
    if m >= 64:
        return 64, block_n, 16, 8
    return 16, block_n, 32, 4


def _too_big(x: torch.Tensor, out_channels: int) -> bool:
    """Whether an input or output element offset could pass 2**31 (the kernels index in int32)."""
    limit = 2**31 - 1
    biggest = max(x.numel(), x.shape[0] * out_channels * x.shape[2] * x.shape[3])
    return x.shape[0] > 1 and (biggest > limit or max(st * (n - 1) for st, n in zip(x.stride(), x.shape)) >= limit)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)  # (b, h, w, c)


def separable_conv(
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
    """Triton version of :func:`~xception.inference.kernels.reference.separable_conv_reference`."""
    if _too_big(x, pw_weight.shape[1]):  # 32-bit offsets in the kernel: split the batch
        half = x.shape[0] // 2
        parts = [separable_conv(x[s], dw_weight, pw_weight, bias, dw_bias=dw_bias, stride=stride, padding=padding,
                                dilation=dilation, relu_in=relu_in, mid_activation=mid_activation,
                                relu_out=relu_out, residual=None if residual is None else residual[s])
                 for s in (slice(0, half), slice(half, None))]
        return torch.cat(parts).contiguous(memory_format=torch.channels_last)
    pw_weight = pw_weight.contiguous()
    bsz, chans, height, width = x.shape
    ks = dw_weight.shape[-1]
    n = pw_weight.shape[1]
    oh = (height + 2 * padding - dilation * (ks - 1) - 1) // stride + 1
    ow = (width + 2 * padding - dilation * (ks - 1) - 1) // stride + 1
    out = torch.empty((bsz, n, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the output {tuple(out.shape)}")
    dw = dw_weight.reshape(chans, ks * ks)
    m = bsz * oh * ow
    block_m, block_n, block_k, warps = _blocks_sepconv(m, n, chans, ieee=pw_weight.dtype == torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    res = residual if residual is not None else out
    _separable_conv_kernel[grid](
        x, dw, dw_bias if dw_bias is not None else dw, pw_weight, bias if bias is not None else dw, res, out,
        bsz, height, width, chans, oh, ow, n,
        *_strides(x), *_strides(res), *_strides(out),
        stride, padding, dilation,
        KS=ks, RELU_IN=relu_in, MID=_MID_CODES[mid_activation], RELU_OUT=relu_out,
        HAS_DW_BIAS=dw_bias is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        IEEE=pw_weight.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def max_pool_add(
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
    """Triton version of :func:`~xception.inference.kernels.reference.max_pool_add_reference`."""
    if _too_big(x, x.shape[1]) or (skip_input is not None and _too_big(skip_input, skip_input.shape[1])):
        half = x.shape[0] // 2
        parts = [max_pool_add(x[s], None if residual is None else residual[s], stride=stride, dilation=dilation,
                              padding=padding, skip_input=None if skip_input is None else skip_input[s],
                              skip_weight=skip_weight, skip_bias=skip_bias, skip_stride=skip_stride)
                 for s in (slice(0, half), slice(half, None))]
        return torch.cat(parts).contiguous(memory_format=torch.channels_last)
    if skip_weight is not None:
        skip_weight = skip_weight.contiguous()
    bsz, chans, height, width = x.shape
    oh, pad_top = pool_output_size(height, stride=stride, dilation=dilation, padding=padding)
    ow, pad_left = pool_output_size(width, stride=stride, dilation=dilation, padding=padding)
    out = torch.empty((bsz, chans, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the pooled {tuple(out.shape)}")
    if skip_weight is not None:
        if skip_input is None:
            raise ValueError("skip_weight needs skip_input")
        sk = skip_input
        sk_out = ((sk.shape[2] - 1) // skip_stride + 1, (sk.shape[3] - 1) // skip_stride + 1)
        if sk_out != (oh, ow) or skip_weight.shape[1] != chans:
            raise ValueError(f"skip conv output {sk_out} x {skip_weight.shape[1]} does not match the pooled "
                             f"{(oh, ow)} x {chans}")
    else:
        sk = x
    res = residual if residual is not None else out
    m = bsz * oh * ow
    if INTERPRET:
        block_m, block_c, block_k, warps = 16, 16, 16, 1
    else:
        # 8 warps: with 4, the batch-1 launches spilled registers (compiled for sm_90, tests/triton_aot.py)
        block_m, block_c, block_k, warps = (64, 64, 32, 8) if skip_weight is not None else (32, 128, 32, 8)
    grid = (triton.cdiv(m, block_m), triton.cdiv(chans, block_c))
    _max_pool_add_kernel[grid](
        x, res, sk, skip_weight if skip_weight is not None else x,
        skip_bias if skip_bias is not None else x, out,
        bsz, height, width, chans, oh, ow, sk.shape[1], sk.shape[2], sk.shape[3],
        *_strides(x), *_strides(res), *_strides(sk), *_strides(out),
        stride, dilation, pad_top, pad_left, skip_stride,
        HAS_RES=residual is not None, HAS_SKIP=skip_weight is not None, HAS_SKIP_BIAS=skip_bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=warps,
    )
    return out
