"""Fast inference: ``optimize(model, device=..., dtype=...)`` returns a module that computes the
same function as ``model.eval()``, faster.

What it does, in order:

1. **Fold batch norms** into the convolution before them (:func:`.folding.fold_batchnorms`),
   checked against the original.
2. **Channels-last and the requested dtype** (fp32, bf16, fp16) for weights and activations.
3. One of the **modes** below; :data:`MODES` lists them.

   * ``"eager"``: 1 + 2, run eagerly (oneDNN on CPU, cuDNN on GPU).
   * ``"compile"``: ``torch.compile`` with Inductor's freezing (weights become constants,
     conv + bias + ReLU and adds fuse). Compiling takes a while (minutes on a small CPU); it
     happens on the first call of each input shape, or in :func:`optimize` if ``example_shape``
     is given.
   * ``"auto"``: ``"compile"``.

   On CUDA, ``cuda_graphs=True`` replays a captured CUDA graph per input shape (batch-1 latency:
   on the H200, compile + graphs 0.51 ms, eager + graphs 0.80 ms, compile alone 3.3 ms).

``dtype="int8"`` (CPU) has two forms (:mod:`.int8`):

* with ``calibration`` (batches of preprocessed images), or for a model loaded from a file
  ``xception quantize`` wrote (its recorded calibration): **static int8**, every conv in int8 with
  per-channel weight scales and activation ranges calibrated on those images, activations int8
  between layers, run by our int8 CPU kernels where they build (:mod:`xception.deploy.kernels`) and by
  PyTorch's quantized CPU kernels otherwise; fast on AVX2 and on VNNI / AMX CPUs.
  ``mode`` does not apply (the result's mode is ``"static"``).
* without: the **dynamic** form, no data needed: the 1x1 convolutions as int8 x int8 -> int32
  products with per-pixel activation scales computed on every call, everything else in bf16
  (modes eager and compile). Fast only where the CPU has int8 dot-product instructions
  (:func:`.cpu.cpu_has_int8_dot`); on an AVX2-only CPU it is far slower than fp32.

The returned module takes and returns tensors like the original (any device, dtype, layout): it
moves the input to the target, and returns the output in the input's dtype on the input's device.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .folding import fold_batchnorms
from .int8 import calibrate_static, int8_model, quantize_pointwise

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The precisions optimize() takes: the float dtypes, and int8 (int8 1x1 convs, the rest bf16).
PRECISIONS = (*DTYPES, "int8")


def resolve_precision(precision: str | torch.dtype) -> tuple[str, torch.dtype]:
    """``(name, activation dtype)`` of a precision: a float dtype (name or torch dtype) or int8."""
    if precision in ("int8", torch.int8):
        return "int8", torch.bfloat16
    for name, dtype in DTYPES.items():
        if precision in (name, dtype):
            return name, dtype
    raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class _Frozen(nn.Module):
    """``torch.compile`` with Inductor's freezing on. Freezing must be set in Inductor's config
    while a graph compiles (passing it in ``torch.compile(options=...)`` was seen not to freeze),
    and compiling happens on the first call of each shape: so every call runs under the patch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


class _CudaGraphs(nn.Module):
    """Replay one captured CUDA graph per input shape (static input/output buffers)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.graphs: dict[tuple, tuple] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.module(static_in)  # warm-up: autotuning, workspace allocation
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: inference only, input/output like the original model's."""

    def __init__(self, module: nn.Module, *, device: torch.device, dtype: torch.dtype, mode: str,
                 precision: str, compile_seconds: float = 0.0) -> None:
        super().__init__()
        self.module = module
        self.device = device
        self.dtype = dtype  # of the activations
        self.precision = precision  # "fp32" | "bf16" | "fp16" | "int8"
        self.mode = mode
        self.compile_seconds = compile_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.module(x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last))
        return y.to(x.device, x.dtype if x.is_floating_point() else torch.float32)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, device={str(self.device)!r}, precision={self.precision!r}"


def optimize(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    mode: str = "auto",
    cuda_graphs: bool = False,
    example_shape: tuple[int, int, int, int] | None = None,
    calibration=None,
) -> OptimizedModel:
    """A faster module computing ``model.eval()``'s function; the original is not modified.

    Args:
        model: any model of :func:`~xception.list_models` (any conv -> BN structure folds).
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: ``"fp32"``, ``"bf16"``, ``"fp16"`` (or the torch dtype), or ``"int8"``: int8 1x1
            convs and bf16 elsewhere, CPU only, modes eager and compile (``auto`` is compile).
        mode: one of :data:`MODES`.
        cuda_graphs: replay CUDA graphs (CUDA only; best for small batches).
        example_shape: run one input of this shape now, so compilation and autotuning happen
            here (their time is in ``compile_seconds`` of the result) rather than on first use.
        calibration: with ``dtype="int8"``, an iterable of (B, C, H, W) float batches, preprocessed
            like the model's inputs: the static int8 path (see above), calibrated on them.
    """
    device = torch.device(device)
    precision, dtype = resolve_precision(dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"dtype 'int8' is a CPU path, got device {str(device)!r} (use bf16 there)")
    from_file = precision == "int8" and calibration is None and getattr(model, "int8_calibration", None) is not None
    if calibration is not None or from_file:
        if precision != "int8":
            raise ValueError(f"calibration applies to dtype 'int8', not {precision!r}")
        if device.type != "cpu":
            raise ValueError(f"dtype 'int8' is a CPU path, got device {str(device)!r} (use bf16 there)")
        start = time.perf_counter()
        static = int8_model(model, device) if from_file else calibrate_static(model, calibration)
        out = OptimizedModel(static, device=device, dtype=torch.float32, precision="int8", mode="static",
                             compile_seconds=time.perf_counter() - start)
        if example_shape is not None:
            out(torch.randn(example_shape))
        return out
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if mode == "auto":
        mode = "compile"
    module: nn.Module = fold_batchnorms(model)
    if precision == "int8":
        n = quantize_pointwise(module)
        log.debug("%d pointwise convs in int8", n)
    module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if mode == "compile":
        module = _Frozen(module)
    if cuda_graphs:
        module = _CudaGraphs(module)
    out = OptimizedModel(module, device=device, dtype=dtype, precision=precision,
                         mode=mode + ("+cuda-graphs" if cuda_graphs else ""))
    if example_shape is not None:
        start = time.perf_counter()
        out(torch.randn(example_shape, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.compile_seconds = time.perf_counter() - start
    return out
