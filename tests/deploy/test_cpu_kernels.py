"""Our int8 CPU kernels (``torch.ops.xception.dw_conv_int8``, ``pw_conv_int8``): the same outputs
as PyTorch's quantized convs over the shapes, strides, paddings, dilations, zero points and fused
ReLUs they take (the pointwise one against the same 7-bit weights); the int8 graph rewrite that
uses them; and the fallback where they cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

import xception
from xception.bench.harness import randomize_batchnorm_
from xception.deploy import kernels as cpu
from xception.deploy.parity import TOLERANCE, relative_error
from xception.deploy.int8.kernel_graph import Int8Depthwise, Int8Pointwise, with_cpu_kernels
from xception.deploy.int8.prepare import STATIC_ENGINE, activation_qconfig, quantized_engine
from xception.deploy.int8.static import calibrate_static


@pytest.fixture(scope="module")
def kernels():
    if not cpu.load():
        pytest.skip(f"int8 CPU kernels unavailable: {cpu.unavailable_reason()}")


def _depthwise(channels, kernel, stride, padding, dilation, relu_out, gen):
    cls = nniq.ConvReLU2d if relu_out else nnq.Conv2d
    conv = cls(channels, channels, kernel, stride=stride, padding=padding, dilation=dilation, groups=channels)
    scales = torch.rand(channels, generator=gen, dtype=torch.double) * 0.01 + 1e-3
    weight = torch.quantize_per_channel(torch.randn(channels, 1, *kernel, generator=gen) * 0.01, scales,
                                        torch.zeros(channels, dtype=torch.long), 0, torch.qint8)
    conv.set_weight_bias(weight, torch.randn(channels, generator=gen) * 0.1)
    conv.scale, conv.zero_point = 0.01, 70
    return conv


def _input(shape, zero_point, gen):
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    return torch.quantize_per_tensor(x, 4 / 127, zero_point, torch.quint8)


# channels: whole 16-channel blocks, an 8-channel block, the scalar rest, and all three
@pytest.mark.parametrize("channels,kernel,stride,padding,dilation,relu_out,zero_point", [
    (32, (3, 3), 1, 1, 1, False, 0),
    (40, (3, 3), 2, 1, 1, True, 9),
    (45, (3, 3), 1, 2, 2, False, 64),
    (3, (3, 3), 1, 0, 1, True, 127),
    (29, (5, 5), 2, 2, 1, False, 3),
    (24, (1, 3), 1, (0, 1), 1, False, 200),
])
def test_depthwise_kernel_matches_pytorch(kernels, channels, kernel, stride, padding, dilation, relu_out, zero_point):
    gen = torch.Generator().manual_seed(channels)
    with quantized_engine(STATIC_ENGINE):
        conv = _depthwise(channels, kernel, stride, padding, dilation, relu_out, gen)
        for relu_in in (False, True):
            x = _input((2, channels, 13, 10), zero_point, gen)
            ref = conv(torch.relu(x) if relu_in else x)
            got = Int8Depthwise(conv, relu_in=relu_in)(x)
            assert got.shape == ref.shape and got.q_scale() == ref.q_scale() and got.q_zero_point() == ref.q_zero_point()
            diff = (got.int_repr().int() - ref.int_repr().int()).abs()
            # the same int32 sums; the float requantization may round a half the other way
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (relu_in, diff.max(), (diff > 0).float().mean())
            assert got.is_contiguous(memory_format=torch.channels_last)


# 3x3, stride 1, dilation 1 runs the row kernel (16-channel blocks, input columns widened once
# and reused) and the per-pixel one for the channels after the blocks: any size and padding
@pytest.mark.parametrize("channels,size,padding", [
    (56, (7, 9), 1),  # 3 blocks + an 8-channel block, Xception's padding
    (45, (5, 6), (0, 2)),  # blocks, 8 channels and the scalar rest; no / wide padding
    (16, (1, 1), 1),  # a single pixel: every column but the middle one is padding
    (32, (4, 3), (1, 0)),  # three columns, no horizontal padding: the output is one pixel wide
    (16, (3, 17), (2, 1)),
])
def test_depthwise_row_kernel_matches_pytorch(kernels, channels, size, padding):
    gen = torch.Generator().manual_seed(channels)
    with quantized_engine(STATIC_ENGINE):
        conv = _depthwise(channels, (3, 3), 1, padding, 1, False, gen)
        for relu_in in (False, True):
            x = _input((2, channels, *size), 70, gen)
            ref = conv(torch.relu(x) if relu_in else x)
            got = Int8Depthwise(conv, relu_in=relu_in)(x)
            assert got.shape == ref.shape
            diff = (got.int_repr().int() - ref.int_repr().int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (relu_in, diff.max(), (diff > 0).float().mean())


def test_depthwise_kernel_rejects_what_does_not_fit(kernels):
    gen = torch.Generator().manual_seed(0)
    with quantized_engine(STATIC_ENGINE):
        dw = Int8Depthwise(_depthwise(16, (3, 3), 1, 1, 1, False, gen))
    with pytest.raises(RuntimeError, match="packed weights do not fit a 24-channel"):
        dw(_input((1, 24, 8, 8), 0, gen))
    with pytest.raises(RuntimeError, match="quint8"):
        dw(torch.randn(1, 16, 8, 8))
    with pytest.raises(RuntimeError, match="too small"):
        Int8Depthwise(_depthwise(16, (3, 3), 1, 0, 2, False, gen))(_input((1, 16, 4, 4), 0, gen))


def _pointwise(k, n, stride, relu_out, gen):
    cls = nniq.ConvReLU2d if relu_out else nnq.Conv2d
    conv = cls(k, n, 1, stride=stride)
    scales = torch.rand(n, generator=gen, dtype=torch.double) * 0.001 + 1e-3
    weight = torch.quantize_per_channel(torch.randn(n, k, 1, 1, generator=gen) * 0.05, scales,
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    conv.set_weight_bias(weight, torch.randn(n, generator=gen) * 0.1)
    conv.scale, conv.zero_point = 0.05, 40
    return conv


# output channels: whole 16-column blocks and a partial one; strides 1 and 2; a leftover pixel row
@pytest.mark.parametrize("k,n,stride,relu_out,zero_point", [
    (64, 128, 1, False, 0), (24, 40, 1, True, 5), (128, 3, 2, False, 60), (16, 17, 2, True, 0),
])
def test_pointwise_kernel_matches_pytorch_on_its_7bit_weights(kernels, k, n, stride, relu_out, zero_point):
    gen = torch.Generator().manual_seed(k + n)
    with quantized_engine(STATIC_ENGINE):
        conv = _pointwise(k, n, stride, relu_out, gen)
        pw = Int8Pointwise(conv)
        w7 = pw.weight_int7()
        assert w7.int_repr().abs().max() <= 63
        # the 7-bit weights are the conv's own, rounded: within half a step inside each channel's
        # range, and no further from them than plain max-scaled 7-bit rounding
        w = conv.weight().dequantize().flatten(1).double()
        step = w7.q_per_channel_scales()[:, None]
        inside = w.abs() <= 63 * step
        assert ((w7.dequantize().flatten(1).double() - w).abs()[inside] <= step.expand_as(w)[inside] / 2 + 1e-7).all()
        plain = w.abs().amax(dim=1, keepdim=True) / 63
        plain_err = (torch.round(w / plain) * plain - w).square().sum(dim=1)
        assert ((w7.dequantize().flatten(1).double() - w).square().sum(dim=1) <= plain_err * (1 + 1e-4) + 1e-12).all()
        reference = (nniq.ConvReLU2d if relu_out else nnq.Conv2d)(k, n, 1, stride=stride)
        reference.set_weight_bias(w7, conv.bias())
        reference.scale, reference.zero_point = conv.scale, conv.zero_point
        x = torch.rand(2, k, 11, 6, generator=gen).contiguous(memory_format=torch.channels_last)
        x = torch.quantize_per_tensor(x * (127 - zero_point) / 127, 1 / 127, zero_point, torch.quint8)  # 7-bit
        ref, got = reference(x), pw(x)
        assert got.shape == ref.shape and got.q_scale() == ref.q_scale() and got.q_zero_point() == ref.q_zero_point()
        diff = (got.int_repr().int() - ref.int_repr().int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())


# the residual add fused into the conv: other + conv, requantized as PyTorch's quantized add does it
@pytest.mark.parametrize("k,n,stride,relu_out", [(64, 128, 1, False), (24, 40, 2, True), (16, 17, 1, False)])
def test_pointwise_kernel_with_residual_add_matches_conv_then_add(kernels, k, n, stride, relu_out):
    gen = torch.Generator().manual_seed(k * n)
    with quantized_engine(STATIC_ENGINE):
        pw = Int8Pointwise(_pointwise(k, n, stride, relu_out, gen))
        x = torch.rand(2, k, 9, 7, generator=gen).contiguous(memory_format=torch.channels_last)
        x = torch.quantize_per_tensor(x, 1 / 127, 0, torch.quint8)
        conv_out = pw(x)
        other = _input(conv_out.shape, 90, gen)
        ref = torch.ops.quantized.add(conv_out, other, 0.07, 33)
        pw.add_scale, pw.add_zero_point = 0.07, 33
        got = pw(x, other)
        assert got.shape == ref.shape and got.q_scale() == 0.07 and got.q_zero_point() == 33
        diff = (got.int_repr().int() - ref.int_repr().int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
        with pytest.raises(RuntimeError, match="the residual has shape"):
            pw(x, other[:, :, :-1])


def test_pointwise_kernel_rejects_what_does_not_fit(kernels):
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.xception.pw_pack_int8(torch.zeros(4, 12, 1, 1, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"\[-63, 63\]"):
        torch.ops.xception.pw_pack_int8(torch.full((4, 16, 1, 1), 64, dtype=torch.int8))
    gen = torch.Generator().manual_seed(0)
    with quantized_engine(STATIC_ENGINE):
        pw = Int8Pointwise(_pointwise(16, 8, 1, False, gen))
    with pytest.raises(RuntimeError, match="do not fit a 24 -> 8 channel"):
        pw(_input((1, 24, 4, 4), 0, gen))


MIDDLE = 2  # middle blocks: each adds 3 separable convs and a residual add, nothing new (the seed has 8)


def _model(middle_blocks: int = MIDDLE) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm_(xception.create_model("xception", num_classes=10, middle_blocks=middle_blocks)).eval()


def _is_add(node) -> bool:
    """An add in an FX graph (``quantized.add``, ``operator.add``, ``torch.add``); by name, not by
    ``str(target)``, which for a plain function holds its address (where "add" can appear in hex)."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "add"


def test_int8_graph_runs_every_depthwise_conv_on_our_kernel(kernels, one_thread):
    model = _model()
    g = torch.Generator().manual_seed(1)
    q = calibrate_static(model, [torch.randn(2, 3, 40, 40, generator=g) for _ in range(2)])
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    separable = 6 + 3 * MIDDLE + 4  # entry 3 blocks x 2, middle x 3, exit 2 + 2
    assert with_cpu_kernels(q._quantized, pointwise=False)[1] == len(depthwise) == separable
    fast, replaced = with_cpu_kernels(q._quantized, pointwise=True)
    assert replaced == separable + len(pointwise) == 2 * separable + 4  # + 4 skip 1x1 convs
    assert sum(isinstance(m, Int8Pointwise) for m in fast.modules()) == separable + 4
    # every residual add (one per middle block, 4 with a skip conv) is folded into a 1x1 conv
    assert sum(isinstance(m, Int8Pointwise) and m.add_scale is not None for m in fast.modules()) == MIDDLE + 4
    assert not [n for n in fast.graph.nodes if _is_add(n)]
    assert [n for n in q._quantized.graph.nodes if _is_add(n)]
    seven_bit = activation_qconfig() == "x86"  # the default uses the pointwise kernel with 7-bit activations
    assert q.graph() is not q._quantized
    assert sum(isinstance(m, Int8Pointwise) for m in q.graph().modules()) == (separable + 4 if seven_bit else 0)
    ours = [m for m in fast.modules() if isinstance(m, Int8Depthwise)]
    # every block but the first (2 entry, the middle ones, 1 exit) opens with a ReLU into a depthwise
    # conv: folded into the kernel
    assert len(ours) == separable and sum(m.relu_in for m in ours) == 2 + MIDDLE + 1
    assert not [n for n in fast.graph.nodes if n.op == "call_module" and type(fast.get_submodule(n.target)) is nn.ReLU]
    assert any(type(m) is nnq.Conv2d and m.groups > 1 for m in q._quantized.modules())  # the input graph kept
    x = torch.randn(2, 3, 40, 40, generator=g)
    with torch.no_grad():
        ref = model(x)
    assert q.uses_cpu_kernels
    ours_out = q(x)
    q.kernels = False
    theirs = q(x)
    # one-step rounding differences carried through the net, and the 7-bit pointwise weights
    assert relative_error(ours_out, theirs) <= 2e-2
    assert relative_error(ours_out, ref) <= TOLERANCE["int8"]
    portable = torch.jit.trace(q.traceable(), x, check_trace=False).inlined_graph  # kernels = False
    q.kernels = True
    ours_graph = torch.jit.trace(q.traceable(), x, check_trace=False).inlined_graph
    assert "xception::dw_conv_int8" in str(ours_graph) and "xception::" not in str(portable)
    if seven_bit:
        assert "xception::pw_conv_add_int8" in str(ours_graph)


def test_without_the_kernels_the_int8_model_runs_pytorch_kernels(monkeypatch, caplog, one_thread):
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("XCEPTION_KERNEL_CACHE", "/nonexistent/cache")  # nothing built there to load
    model = _model()
    q = calibrate_static(model, [torch.randn(1, 3, 32, 32)])
    with caplog.at_level("WARNING"):
        y = q(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 10) and not q.uses_cpu_kernels
    assert "int8 CPU kernels unavailable" in caplog.text and cpu.unavailable_reason()
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setenv("XCEPTION_CPU_KERNELS", "0")
    assert not cpu.load() and cpu.unavailable_reason() == "XCEPTION_CPU_KERNELS=0"
