"""How close a fast path is to the model it replaces: relative error and the bounds we hold to.

Every fast path (folded, fused, compiled, int8, exported) is compared with the fp32 eager model
on the same input; :data:`TOLERANCE` is the bound for each precision.
"""

from __future__ import annotations

import torch

# Relative L2 error bounds against the fp32 eager model. int8 (int8 1x1 convs, bf16 elsewhere)
# is held to the reduced-precision bound.
# int8: the dynamic form (per-pixel scales, 1x1 convs only) lands near bf16; the static form
# (per-tensor activation ranges from calibration, every conv) lands at 1.5-2.5e-2 on random
# weights at 299 px, like OpenVINO's and ONNX Runtime's int8 (1.5-4.6e-2), so it gets 5e-2.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2, "int8": 5e-2}
# An exported file (ONNX, TorchScript, exported program) in fp32 against PyTorch fp32.
EXPORT_TOLERANCE = 1e-4


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives ``inf``."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
