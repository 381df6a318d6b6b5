"""optimize(): batch-norm folding and the fast paths compute the fp32 eager model's function."""

from __future__ import annotations

import pytest
import torch
from model_names import distinct_models
from torch import nn

import xception
from xception.bench.harness import randomize_batchnorm_
from xception.deploy.folding import fold_batchnorms
from xception.deploy.optimize import optimize
from xception.deploy.parity import relative_error

FP32, BF16 = 1e-5, 2e-2  # the parity bounds against the fp32 eager model


def _model(name: str = "xception", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    small = {"middle_blocks": 1} if name == "xception" else {}
    try:
        m = xception.create_model(name, **{**small, **kwargs})
    except (TypeError, ValueError):
        m = xception.create_model(name, **kwargs)
    return randomize_batchnorm_(m, generator=torch.Generator().manual_seed(1)).eval()


def _check(fast: nn.Module, model: nn.Module, x: torch.Tensor, bound: float) -> float:
    with torch.no_grad():
        ref = model(x)
    out = fast(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = relative_error(out, ref)
    assert err <= bound, err
    return err


@pytest.mark.parametrize("name", distinct_models())
def test_eager_paths_every_model(name):
    model = _model(name)
    # small and odd: bf16 is emulated (slow) on CPUs without native bf16
    x = torch.randn(1, model.config.in_chans if hasattr(model, "config") else 3, 25, 25)
    folded = fold_batchnorms(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_left < n_bn  # something was folded
    _check(optimize(model, mode="eager", dtype="fp32"), model, x, FP32)
    _check(optimize(model, mode="eager", dtype="bf16"), model, x, BF16)
    # the original model is left as it was
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn


@pytest.mark.slow
def test_compile_mode_same_function():
    """optimize's default path on a CPU, mode "compile": Inductor with freezing on the folded,
    channels-last seed model (one middle block: the others are the same code)."""
    model = _model(middle_blocks=1, num_classes=7)
    fast = optimize(model, mode="compile", dtype="fp32")
    assert fast.mode == "compile"
    _check(fast, model, torch.randn(2, 3, 41, 41), FP32)


def test_seed_model_folds_every_batchnorm():
    folded = fold_batchnorms(_model(middle_blocks=0))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


CONFIGS = [  # (config, input size, dtypes): odd and even sizes through every pool
    (dict(), (63, 63), ("fp32", "bf16")),
    (dict(pool_padding="same", output_stride=16, global_pool="max"), (64, 70), ("fp32",)),
    (dict(output_stride=8, pool_padding="same", intermediate_activation="elu", num_classes=0), (58, 61), ("fp32",)),
    (dict(residual=False, intermediate_activation="relu", middle_blocks=0), (40, 40), ("fp32",)),
]


@pytest.mark.parametrize("config,size,dtypes", CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else None)
def test_folded_path_same_function_odd_configs(config, size, dtypes):
    """Folding and channels-last keep the function through every pool, padding, stride and activation."""
    model = _model(**config)
    x = torch.randn(1, 3, *size)
    for dtype in dtypes:
        _check(optimize(model, mode="eager", dtype=dtype), model, x, FP32 if dtype == "fp32" else BF16)


def test_fold_handles_dilation_stride_groups_and_bias():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8, eps=1e-3),
        nn.Conv2d(8, 6, 1, groups=2, bias=False), nn.BatchNorm2d(6, affine=False))
    randomize_batchnorm_(net)
    folded = fold_batchnorms(net, example_size=17)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 4, 19, 23)
    assert relative_error(folded(x), net.eval()(x)) <= FP32


class _Shared(nn.Module):
    """A conv whose output is read by its BN and by something else: folding must not happen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_check_catches_a_wrong_fold():
    net = randomize_batchnorm_(_Shared())
    with pytest.raises(RuntimeError, match="folding changed"):
        fold_batchnorms(net, example_size=8)


def test_bad_arguments():
    model = _model(middle_blocks=0)
    with pytest.raises(ValueError, match="mode"):
        optimize(model, mode="turbo")
    with pytest.raises(ValueError, match="dtype"):
        optimize(model, dtype="int4")
    with pytest.raises(ValueError, match="cuda_graphs"):
        optimize(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="input"):
        optimize(model, mode="eager")(torch.randn(1, 3, 5, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,bound", [("fp32", FP32), ("bf16", BF16)])
def test_cuda_paths_and_graphs(dtype, bound):
    model = _model(pool_padding="same")
    x = torch.randn(2, 3, 75, 80)
    _check(optimize(model, device="cuda", mode="eager", dtype=dtype), model, x, bound)
    _check(optimize(model, device="cuda", mode="eager", dtype=dtype, cuda_graphs=True), model, x, bound)
