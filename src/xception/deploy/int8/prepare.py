"""Static int8, step one: the model's feature extractor prepared for calibration (FX graph mode,
conv + BN (+ ReLU) fused, an observer on every activation), and the quantized-kernel backend."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..cpu import cpu_has_int8_dot

# PyTorch's quantized-kernel backend for the static path: the weights are packed for it when the
# model is converted. Packed for oneDNN the calibrated network ran fastest on the project's AVX2
# machine (299 px, batch 1, 2 threads, same process: 73-91 ms per image against 94-101 packed for
# "x86" and 88-106 for fbgemm), and oneDNN is the backend with VNNI / AMX kernels on newer CPUs.
STATIC_ENGINE = "onednn"
_OBSERVER_KEY = "activation_post_process_"


@contextlib.contextmanager
def quantized_engine(name: str):
    """PyTorch's quantized-kernel backend set to ``name`` for a while."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class _Features(nn.Module):
    """``model.forward_features`` as a module: the part the static path quantizes. The global pool
    and the classifier stay in fp32 (~0.03% of the work; the quantized mean also fails on the 1x1
    channels-last map that 32 px inputs end with)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def prepare_static(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model``'s feature extractor (eval mode, CPU, fp32) with conv + BN (+ ReLU) fused
    and an observer on every activation, ready for calibration batches (or recorded states)."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    features = _Features(copy.deepcopy(model).eval().cpu().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FX quantization API's deprecation notices
        return prepare_fx(features, get_default_qconfig_mapping(activation_qconfig()),
                          example_inputs=(example.cpu().float(),))


def activation_qconfig() -> str:
    """Which default qconfig the activations get: ``"onednn"`` (full 8-bit range) on CPUs with
    int8 dot-product instructions, else ``"x86"`` (7-bit: without VNNI the u8 x s8 pair products
    are summed in saturating int16, and full-range activations overflow it: on the AVX2 machine
    the demo's digits model fell from 99.44% to 97.2% top-1, logits 28% off, against 99.44% and
    2.6% off with 7-bit activations). Decided when the model is converted, so a calibration
    written on one machine runs right on another: the observers' histograms are what is stored."""
    return "onednn" if cpu_has_int8_dot() else "x86"


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The activation observers' state (ranges and histograms) of a calibrated prepared model."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if k.startswith(_OBSERVER_KEY)}
