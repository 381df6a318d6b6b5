"""Inference: classifying and explaining images, evaluation, and the fast paths.

    classify   Classifier (the Python API), decode_predictions, loading any weights for inference
    explain    class-activation maps (Grad-CAM, Grad-CAM++, ...) and their figures
    report     eval --report: confusion matrix, per-class precision/recall/F1, mistakes gallery
    summary    the layer table (torchinfo)
    predict    classify images, evaluate any weights on held-out data
    folding    batch norms folded into convolutions (export and every fast path start here)
    fused      the seed model run by the fused Triton kernels (kernels/)
    quantize   int8 for CPUs: static (every conv, calibrated) and dynamic (1x1 convs, no data)
    calibrate  xception quantize: calibration on a user's images, the int8 file
    optimize   optimize(): folding + dtype + eager / compile / fused / CUDA graphs
    parity     relative error and the bounds each precision is held to
    export     ONNX, TorchScript, exported program, with a parity check
    bench      our paths against the peers people deploy with, in one process
"""

from .optimize import MODES, PRECISIONS, OptimizedModel, optimize

__all__ = ["MODES", "PRECISIONS", "OptimizedModel", "optimize"]
