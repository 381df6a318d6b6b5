"""Int8 on the CPU, in files by concern.

    dynamic        int8 1x1 convs with per-pixel scales, no calibration data (fast with VNNI / AMX)
    prepare        the FX-prepared feature extractor and its observers; the quantized-kernel backend
    rounding       7-bit 1x1 weights: per-channel scale, GPTQ rounding under the calibration inputs
    kernel_graph   a converted graph rewritten onto our CPU kernels (:mod:`xception.deploy.kernels`)
    static         StaticInt8: calibrate, convert, save and reload the static form
    calibrate      ``xception quantize``: calibration on a user's images, the int8 file
"""

from .dynamic import Int8PointwiseConv, quantize_pointwise
from .static import StaticInt8, calibrate_static, int8_model, save_int8

__all__ = ["Int8PointwiseConv", "StaticInt8", "calibrate_static", "int8_model", "quantize_pointwise", "save_int8"]
