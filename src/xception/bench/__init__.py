"""The benchmark harness: our fast paths against the engines people deploy Xception with.

    harness   run_bench(): every candidate built, checked for parity and timed in interleaved rounds
    peers     timm (eager, compiled), ONNX Runtime (fp32, static int8), OpenVINO (default, f32, int8)

Nothing in the package imports it but the command line (``xception bench``).
"""

from .harness import format_table, run_bench

__all__ = ["format_table", "run_bench"]
