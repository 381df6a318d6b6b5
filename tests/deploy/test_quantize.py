"""Int8 pointwise convolutions: exact integer arithmetic, the parity bound through whole models,
and the int8 path of optimize() / xception bench."""

from __future__ import annotations

import pytest
import torch
from model_names import distinct_models
from torch import nn

import xception
from xception.bench.harness import randomize_batchnorm_
from xception.deploy.int8.dynamic import Int8PointwiseConv, quantize_pointwise
from xception.deploy.optimize import optimize
from xception.deploy.parity import relative_error

BF16 = 2e-2  # int8 is held to the reduced-precision (bf16) parity bound


def _emulated(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What the int8 conv must compute, in float64: quantize, dequantize, convolve."""
    x = x.double()[:, :, ::conv.stride[0], ::conv.stride[1]]
    rows = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    amax = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    xq = torch.round(rows * (127 / amax)) * (amax / 127)
    w = conv.weight.double().flatten(1)  # (O, C)
    s_w = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    wq = torch.round(w / s_w) * s_w
    y = xq @ wq.t() + (conv.bias.double() if conv.bias is not None else 0)
    return y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("stride,bias,channels_last", [(1, True, True), (2, False, False), (1, False, False)])
def test_int8_conv_is_exact_integer_arithmetic(stride, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, stride=stride, bias=bias)
    x = torch.randn(2, 24, 9, 7) * torch.rand(2, 1, 9, 7) * 5  # rows of different ranges
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q = Int8PointwiseConv(conv)
    assert q.weight_q.dtype == torch.int8
    with torch.no_grad():
        out, ref = q(x), conv(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # exactly the quantized function (int32 accumulation, fp32 rescale) ...
    torch.testing.assert_close(out.double(), _emulated(conv, x), rtol=1e-5, atol=1e-5)
    # ... which is close to the float conv, but not equal to it
    err = relative_error(out, ref)
    assert 1e-5 < err < 2e-2


def test_int8_conv_keeps_fp32_scales_and_bf16_activations():
    conv = nn.Conv2d(16, 8, 1)
    q = Int8PointwiseConv(conv).to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float32
    assert q.weight_q.dtype == torch.int8
    x = torch.randn(1, 16, 5, 5, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected"):
        q(torch.randn(1, 15, 5, 5))
    with pytest.raises(ValueError, match="1x1"):
        Int8PointwiseConv(nn.Conv2d(16, 8, 3))
    with pytest.raises(ValueError, match="1x1"):
        Int8PointwiseConv(nn.Conv2d(16, 8, 1, padding=1))


def test_quantize_pointwise_picks_wide_1x1_convs():
    net = nn.Sequential(nn.Conv2d(3, 128, 3), nn.Conv2d(128, 64, 1), nn.Conv2d(64, 8, 1),
                        nn.Conv2d(8, 8, 3, groups=8))
    assert quantize_pointwise(net) == 1
    assert [type(m).__name__ for m in net] == ["Conv2d", "Int8PointwiseConv", "Conv2d", "Conv2d"]
    assert quantize_pointwise(net, min_in_channels=1) == 1  # the 64 -> 8 conv; not the 3x3 ones


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"middle_blocks": 1} if name == "xception" else {}
    m = xception.create_model(name, **kwargs)
    return randomize_batchnorm_(m, generator=torch.Generator().manual_seed(1)).eval()


@pytest.mark.parametrize("name", distinct_models())
def test_int8_path_every_model(name):
    model = _model(name)
    x = torch.randn(2, 3, 29, 24)  # odd and even sides; small: int8 products are slow without VNNI
    fast = optimize(model, mode="eager", dtype="int8")
    assert fast.precision == "int8" and fast.dtype == torch.bfloat16
    n_int8 = sum(isinstance(m, Int8PointwiseConv) for m in fast.modules())
    n_wide = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.in_channels >= 128
                 for m in model.modules())
    assert n_int8 == n_wide > 0
    with torch.no_grad():
        ref = model(x)
    out = fast(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert relative_error(out, ref) <= BF16


@pytest.mark.slow
def test_int8_compiled_matches_eager():
    """Inductor compiles the int8 1x1 convs with what surrounds them (BN folded into a conv, ReLU,
    residual add, a pool): a small network of Xception's layer kinds, so the compile stays short."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 128, 3, stride=2, bias=False), nn.BatchNorm2d(128), nn.ReLU())
            self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False)
            self.pw = nn.Sequential(nn.Conv2d(128, 256, 1, bias=False), nn.BatchNorm2d(256))
            self.skip = nn.Sequential(nn.Conv2d(128, 256, 1, bias=False), nn.BatchNorm2d(256))
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            x = self.stem(x)
            x = self.pw(self.dw(torch.relu(x))) + self.skip(x)
            return self.head(torch.relu(x).mean((2, 3)))

    torch.manual_seed(0)
    model = randomize_batchnorm_(Net(), generator=torch.Generator().manual_seed(1)).eval()
    x = torch.randn(1, 3, 45, 45)
    with torch.no_grad():
        ref = model(x)
    compiled = optimize(model, mode="compile", dtype="int8", example_shape=tuple(x.shape))
    assert sum(isinstance(m, Int8PointwiseConv) for m in compiled.modules()) == 2
    assert relative_error(compiled(x), ref) <= BF16


def test_int8_arguments():
    model = _model("xception")
    with pytest.raises(ValueError, match="CPU path"):
        optimize(model, device="cuda", dtype="int8")
    eager = optimize(model, mode="eager", dtype="int8")
    assert eager.mode == "eager" and any(isinstance(m, Int8PointwiseConv) for m in eager.modules())
    assert optimize(model, dtype=torch.int8, mode="eager").precision == "int8"
    assert optimize(model, dtype=torch.bfloat16, mode="eager").precision == "bf16"
