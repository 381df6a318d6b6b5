"""The fast paths and export: what makes a trained model run fast, and files other engines load.

    optimize   optimize(): folding + channels-last + dtype + eager / compile / CUDA graphs / int8
    folding    batch norms folded into convolutions (export and every fast path start here)
    parity     relative error and the bounds each precision is held to
    cpu        this CPU's feature flags and the fast paths they allow
    int8/      dynamic and static int8 for CPUs, the calibration file (``xception quantize``)
    kernels/   our int8 CPU kernels: the C++ source and its build-on-first-use loader
    export     ONNX, TorchScript, exported program, with a parity check
"""

from .optimize import MODES, PRECISIONS, OptimizedModel, optimize

__all__ = ["MODES", "PRECISIONS", "OptimizedModel", "optimize"]
