"""GPTQ rounding of the 1x1 weights to 7 bits (:mod:`xception.deploy.int8.rounding`): it lowers the
conv's output error on correlated inputs, reduces to nearest rounding on uncorrelated ones, and
calibration stores the rounded weights that our 1x1 kernel then multiplies by."""

from __future__ import annotations

import pytest
import torch

import xception
from xception.bench.harness import randomize_batchnorm_
from xception.deploy import kernels as cpu
from xception.deploy.int8.kernel_graph import Int8Pointwise, with_cpu_kernels
from xception.deploy.int8.prepare import activation_qconfig
from xception.deploy.int8.static import StaticInt8, calibrate_static
from xception.deploy.int8.rounding import InputMoments, gptq_round, round_to_7bit


def _output_error(weight, q, scale, hessian):
    delta = (q.double() * scale.double()[:, None] - weight.double())
    return float(torch.einsum("nk,kl,nl->", delta, hessian.double(), delta))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    n, k = 48, 96
    weight = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(2000, 12, generator=gen) @ torch.randn(12, k, generator=gen) + 0.2 * torch.randn(2000, k, generator=gen)
    hessian = (x.T @ x).double()
    scale, nearest = round_to_7bit(weight)
    q = gptq_round(weight, hessian, scale)
    assert q.dtype == torch.int8 and q.shape == (n, k) and int(q.abs().max()) <= 63
    assert _output_error(weight, q, scale, hessian) < 0.5 * _output_error(weight, nearest, scale, hessian)
    # the weights themselves move further from the fp32 ones: the error goes where inputs do not
    assert _output_error(weight, q, scale, torch.eye(k)) > _output_error(weight, nearest, scale, torch.eye(k))


def test_gptq_is_nearest_rounding_for_uncorrelated_inputs():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 40, generator=gen)
    scale, nearest = round_to_7bit(weight)
    hessian = torch.diag(torch.rand(40, generator=gen) + 0.5).double()
    assert torch.equal(gptq_round(weight, hessian, scale), nearest)


def test_gptq_zeroes_inputs_never_seen_and_checks_shapes():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 16, generator=gen)
    x = torch.randn(100, 16, generator=gen)
    x[:, 5] = 0
    scale, _ = round_to_7bit(weight)
    q = gptq_round(weight, (x.T @ x).double(), scale)
    assert (q[:, 5] == 0).all() and (q[:, :5] != 0).any()
    with pytest.raises(ValueError, match=r"needs a \(16, 16\) hessian"):
        gptq_round(weight, torch.eye(15), scale)


def test_input_moments_sum_what_the_conv_sees():
    conv = torch.nn.Conv2d(8, 4, 1, stride=2)
    moments = InputMoments({"c": conv})
    x = torch.randn(2, 8, 5, 5)
    conv(x)
    conv(x)
    moments.close()
    conv(x)  # after close: not counted
    rows = x[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 8).double()
    torch.testing.assert_close(moments.moments["c"], 2 * rows.T @ rows, rtol=1e-5, atol=1e-5)  # fp32 per call


MIDDLE = 2  # the seed's 8 middle blocks repeat the same convs
POINTWISE = 6 + 3 * MIDDLE + 4 + 4  # one per separable conv (entry 6, middle 3 each, exit 4) + 4 skip convs


@pytest.fixture(scope="module")
def calibrated():
    if not cpu.load():
        pytest.skip(f"int8 CPU kernels unavailable: {cpu.unavailable_reason()}")
    torch.manual_seed(0)
    model = randomize_batchnorm_(xception.create_model("xception", num_classes=10, middle_blocks=MIDDLE)).eval()
    g = torch.Generator().manual_seed(3)
    return model, calibrate_static(model, [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)])


def test_calibration_stores_7bit_weights_our_kernel_uses(calibrated, one_thread):
    """Every calibration stores the GPTQ-rounded 7-bit weights. Which kernel runs the 1x1 convs
    depends on the CPU class: without int8 dot products (AVX2) activations are 7-bit and all run
    on our GEMM with exactly the stored weights; with VNNI / AMX activations keep 8 bits and the
    1x1 convs stay on oneDNN (the stored weights unused). Either way a kernel graph built with the
    stored weights multiplies by them."""
    model, q = calibrated
    stored = {k for k in q.state if k.startswith("pointwise_int7.")}
    assert len(stored) == 2 * POINTWISE  # every 1x1 conv: weight and scale
    seven_bit = activation_qconfig() == "x86"
    ours = [m for m in q.graph().modules() if isinstance(m, Int8Pointwise)]
    assert len(ours) == (POINTWISE if seven_bit else 0), f"{len(ours)} 1x1 convs on our kernel, activations {activation_qconfig()}"
    graph, _ = with_cpu_kernels(q._quantized, pointwise=True, rounded=q._rounded)
    differ = 0
    for name, module in graph.named_modules():
        if isinstance(module, Int8Pointwise):
            w = q.state[f"pointwise_int7.{name}.weight"]
            assert torch.equal(module.weight_int7().int_repr().flatten(1), w)
            _, nearest = round_to_7bit(q._quantized.get_submodule(name).weight().dequantize().double().flatten(1))
            differ += not torch.equal(nearest, w)
    assert differ == POINTWISE
    x = torch.randn(1, 3, 32, 32)
    again = StaticInt8(model, q.state, q.info)  # rebuilt from the stored state
    again.frozen = q.frozen = False
    assert torch.equal(again(x), q(x))
    old = {k: v for k, v in q.state.items() if not k.startswith("pointwise_int7.")}
    without = StaticInt8(model, old, q.info)  # a calibration without them: nearest rounding
    without.frozen = False
    assert without(x).shape == (1, 10)
    assert torch.equal(without(x), q(x)) != seven_bit  # only our 7-bit kernel multiplies by them
    q.frozen = True


def test_stored_7bit_weights_must_fit_the_model(calibrated):
    model, q = calibrated
    key = next(k for k in q.state if k.startswith("pointwise_int7.") and k.endswith(".weight"))
    broken = {**q.state, key: q.state[key][:, :8].contiguous()}
    with pytest.raises(ValueError, match="do not fit a 1x1 conv of this model"):
        StaticInt8(model, broken, q.info)
    wide = q.state[key].clone()
    wide[0, 0] = 64  # past [-63, 63]: the kernel's int16 sums could overflow
    too_wide = {**q.state, key: wide}
    with pytest.raises(ValueError, match="do not fit a 1x1 conv of this model"):
        StaticInt8(model, too_wide, q.info)
    partial = {k: v for k, v in q.state.items() if k != key}
    with pytest.raises(ValueError, match="partial 7-bit weight"):
        StaticInt8(model, partial, q.info)
