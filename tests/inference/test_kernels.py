"""The fused Triton kernels against their PyTorch references, on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, tiny shapes: it is slow), and on CUDA when present."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from xception.inference import kernels
from xception.inference.kernels import max_pool_add_reference, pool_output_size, separable_conv_reference

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the kernel output"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tk():
    """The Triton kernels module, imported under the interpreter unless CUDA is there."""
    if torch.cuda.is_available():
        yield importlib.import_module("xception.inference.kernels.triton_kernels"), "cuda"
        return
    mod = kernels._tk
    if mod is not None and not mod.INTERPRET:
        pytest.skip("Triton kernels already compiled for a GPU in this process")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by Triton at decoration and while running kernels
    try:
        mod = kernels._triton()
        if mod is None or not mod.INTERPRET:
            pytest.skip("could not load the Triton kernels under the interpreter")
        yield mod, "cpu"
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


SEP_CASES = [
    # (C, N, H, W, stride, padding, dilation, relu_in, mid, relu_out, residual, dw_bias, dtype, layout)
    (16, 20, 5, 6, 1, 1, 1, True, "none", False, False, False, torch.float32, "cl"),
    (17, 16, 6, 5, 1, 2, 2, False, "relu", True, True, True, torch.float32, "nchw"),
    (16, 18, 7, 6, 2, 1, 1, True, "elu", False, False, False, torch.bfloat16, "cl"),
    (20, 16, 5, 5, 1, 1, 1, True, "none", True, True, False, torch.bfloat16, "cl"),
]


@pytest.mark.parametrize("case", SEP_CASES, ids=lambda c: f"{c[12]}-s{c[4]}d{c[6]}-{c[8]}")
def test_separable_conv_matches_reference(tk, case):
    mod, dev = tk
    c, n, h, w, stride, pad, dil, relu_in, mid, relu_out, res, dwb, dtype, layout = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(1, c, h, w, generator=g).to(dev, dtype)
    x = _cl(x) if layout == "cl" else x.contiguous()
    dw = torch.randn(c, 1, 3, 3, generator=g).to(dev, dtype)
    pw = torch.randn(c, n, generator=g).div(c ** 0.5).to(dev, dtype)
    bias = torch.randn(n, generator=g).to(dev)
    oh, ow = (h + 2 * pad - 2 * dil - 1) // stride + 1, (w + 2 * pad - 2 * dil - 1) // stride + 1
    kw = dict(dw_bias=torch.randn(c, generator=g).to(dev) if dwb else None, stride=stride, padding=pad,
              dilation=dil, relu_in=relu_in, mid_activation=mid, relu_out=relu_out,
              residual=_cl(torch.randn(1, n, oh, ow, generator=g).to(dev, dtype)) if res else None)
    out = mod.separable_conv(x, dw, pw, bias, **kw)
    assert out.shape == (1, n, oh, ow) and out.dtype == dtype
    # against the same function computed in fp32 from the same (rounded) operands
    exact = separable_conv_reference(x.float(), dw.float(), pw.float(), bias, **{
        **kw, "residual": None if kw["residual"] is None else kw["residual"].float()})
    assert rel(out.float().cpu(), exact.cpu()) <= (1e-5 if dtype == torch.float32 else 2e-2)
    if relu_out:
        assert (out >= 0).all()


@pytest.mark.parametrize("size", [(5, 6), (7, 7)])
@pytest.mark.parametrize("padding", [1, "same"])
def test_max_pool_add_matches_reference(tk, size, padding):
    mod, dev = tk
    h, w = size
    g = torch.Generator().manual_seed(h * 10 + w)
    x = _cl(torch.randn(1, 16, h, w, generator=g)).to(dev)
    oh, _ = pool_output_size(h, stride=2, dilation=1, padding=padding)
    ow, _ = pool_output_size(w, stride=2, dilation=1, padding=padding)
    res = torch.randn(1, 16, oh, ow, generator=g).to(dev)
    out = mod.max_pool_add(x, res, stride=2, padding=padding)
    ref = max_pool_add_reference(x, res, stride=2, padding=padding)
    assert out.shape == ref.shape == (1, 16, oh, ow)
    assert rel(out.cpu(), ref.cpu()) <= 1e-6
    if padding == "same":  # the model's own MaxPool2dSame is the function to keep
        from xception.models.layers import MaxPool2dSame

        assert rel(out.cpu(), (MaxPool2dSame(3, 2)(x) + res).cpu()) <= 1e-6


@pytest.mark.parametrize("dtype,size,padding", [(torch.float32, 7, 1), (torch.bfloat16, 6, "same")])
def test_max_pool_with_fused_skip_conv(tk, dtype, size, padding):
    mod, dev = tk
    g = torch.Generator().manual_seed(size)
    x = _cl(torch.randn(1, 16, size, size, generator=g)).to(dev, dtype)
    inp = _cl(torch.randn(1, 18, size, size, generator=g)).to(dev, dtype)
    wgt = torch.randn(18, 16, generator=g).div(18 ** 0.5).to(dev, dtype)
    b = torch.randn(16, generator=g).to(dev)
    kw = dict(stride=2, padding=padding, skip_input=inp, skip_weight=wgt, skip_bias=b, skip_stride=2)
    out = mod.max_pool_add(x, **kw)
    exact = max_pool_add_reference(x.float(), **{**kw, "skip_input": inp.float(), "skip_weight": wgt.float()})
    assert out.dtype == dtype
    assert rel(out.float().cpu(), exact.cpu()) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_dilated_stride1_pool(tk):
    """output_stride turns the pool into stride 1, dilation 2 (padding 2): same size out."""
    mod, dev = tk
    x = _cl(torch.randn(1, 16, 5, 6)).to(dev)
    res = torch.randn(1, 16, 5, 6).to(dev)
    out = mod.max_pool_add(x, res, stride=1, dilation=2, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=float("-inf"))  # torch refuses padding 2 here
    ref = torch.nn.functional.max_pool2d(padded, 3, 1, 0, 2) + res
    assert rel(out.cpu(), ref.cpu()) <= 1e-6


def test_shape_mismatch_is_refused(tk):
    mod, dev = tk
    x = torch.randn(1, 16, 6, 6).to(dev)
    with pytest.raises(ValueError, match="residual shape"):
        mod.max_pool_add(x, torch.randn(1, 16, 4, 4).to(dev), stride=2, padding=1)


def test_dispatch_falls_back_without_triton_on_cpu(monkeypatch):
    """Where Triton can't run (CPU, no interpreter), the dispatchers use the references."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 8, 5, 5)
    assert not kernels.triton_usable(x)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(8, 4)
    out = kernels.separable_conv(x, dw, pw, None, relu_in=True)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x.relu(), dw, None, 1, 1, 1, 8), pw.t()[:, :, None, None])
    assert rel(out, ref) <= 1e-6


@pytest.mark.slow
def test_kernels_compile_for_h100_within_shared_memory():
    """Every launch the fused network makes (flags, block sizes, fp32 and bf16) compiles for
    sm_90 with Triton's compiler and ptxas, no GPU needed, and fits in shared memory."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["x"]) for r in rows} == {
        (k, x) for k in ("_separable_conv_kernel", "_max_pool_add_kernel") for x in ("*bf16", "*fp32")}
    assert {r["flags"]["HAS_SKIP"] for r in rows if r["kernel"] == "_max_pool_add_kernel"} == {True, False}
    assert {r["flags"]["MID"] for r in rows if r["kernel"] == "_separable_conv_kernel"} >= {0, 2}
    assert all(r["cubin_bytes"] > 0 for r in rows)
    # 99 KiB: the most one block may use on sm_86/89; sm_80 allows 163 KiB, sm_90 227 KiB
    assert max(r["shared"] for r in rows) <= 99 * 1024, max(rows, key=lambda r: r["shared"])
    # the bf16 separable conv, most of the network's time, keeps everything in registers
    fast = [r for r in rows if r["kernel"] == "_separable_conv_kernel" and r["x"] == "*bf16" and "stack" in r]
    assert all(r["stack"] == 0 and r["registers"] <= 255 for r in fast), fast
