"""Export a model to ONNX, TorchScript or a ``torch.export`` program, with a parity check.

``export_model(model, fmt, out_path)`` exports the batch-norm-folded model (same function, fewer
ops; the int8 model of a file ``xception quantize`` wrote: TorchScript only) with a dynamic batch
axis, then loads the written file back and runs batch 1 and batch 3 through it (ONNX through ONNX
Runtime), comparing with the PyTorch model (fp32, or that int8 model). The file is
written to a temporary name in the target folder and moved into place only after the check
passes, so a failed export never leaves (or replaces) a file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..extras import require
from ..fileio import atomic_path
from ..preprocessing import Preprocessing
from .folding import fold_batchnorms
from .parity import EXPORT_TOLERANCE, relative_error
from .int8.prepare import STATIC_ENGINE, quantized_engine
from .int8.static import int8_model

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    errors: dict[int, float]  # batch size -> relative L2 error against PyTorch fp32 (empty: no check)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(max(q.getEffectiveLevel(), logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["input"],
                              output_names=["output"], dynamic_shapes=({0: batch},), verbose=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _onnx_runner(path: str):
    ort = require("onnxruntime", "onnx", "the ONNX parity check (or pass check=False / --no-check)")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _export(model: nn.Module, fmt: str, example: torch.Tensor, path: str):
    """Write ``model`` to ``path``; return a function that runs the written file."""
    if fmt == "onnx":
        _export_onnx(model, example, path)
        return _onnx_runner(path)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input-shape checks freeze
            traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, path)
        loaded = torch.jit.load(path, map_location="cpu")
        return lambda x: loaded(x)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return lambda x: loaded(x)


def export_model(
    model: nn.Module,
    fmt: str,
    out_path: str | os.PathLike,
    *,
    image_size: int | None = None,
    check: bool = True,
    fold: bool = True,
) -> ExportReport:
    """Export ``model`` (fp32, CPU, eval mode) to ``out_path`` in format ``fmt`` (:data:`FORMATS`).

    Args:
        image_size: side of the example input used to trace (default: the model's
            ``preprocessing``); the batch axis stays dynamic (ONNX and exported programs; a
            TorchScript trace runs any batch as well).
        check: run batch 1 and 3 through the written file and require a relative L2 error
            <= 1e-4 against PyTorch fp32; on failure nothing is written.
        fold: fold batch norms into the convolutions first (same function).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"output path {str(out)!r} is a directory")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {str(out.parent)!r} does not exist")
    if image_size is None:
        image_size = getattr(model, "preprocessing", Preprocessing()).image_size
    if fmt == "onnx":
        require("onnxscript", "onnx", "ONNX export")
    model = model.eval().cpu().float()
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    stack = contextlib.ExitStack()
    if getattr(model, "int8_calibration", None) is not None:  # a file `xception quantize` wrote
        if fmt != "torchscript":
            raise ValueError(f"int8 weights export as TorchScript only (--format torchscript), not {fmt}; for "
                             f"{fmt}, export their fp32 weights (`xception convert` writes them without the int8)")
        model = int8_model(model)  # checked against the int8 model itself
        model.kernels = False  # PyTorch's quantized ops only: the file loads without this package
        exported = model.traceable()
        # TorchScript repacks int8 weights for the quantized engine active when it loads them: the
        # check loads them for the engine our int8 model runs (another engine rounds a little
        # differently, ~1e-3 relative)
        stack.enter_context(quantized_engine(STATIC_ENGINE))
    else:
        exported = fold_batchnorms(model) if fold else model
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, in_chans, image_size, image_size, generator=gen)
    errors: dict[int, float] = {}
    with stack, atomic_path(out, suffix=f".tmp{SUFFIXES[fmt]}") as tmp:  # moved into place only if the check passes
        run = _export(exported, fmt, example, str(tmp))
        if check:
            for batch in (1, 3):
                x = torch.randn(batch, in_chans, image_size, image_size, generator=gen)
                with torch.no_grad():
                    ref = model(x)
                    got = run(x)
                if tuple(got.shape) != tuple(ref.shape):
                    raise ValueError(f"exported {fmt} gives shape {tuple(got.shape)} at batch {batch}, "
                                     f"PyTorch {tuple(ref.shape)}")
                errors[batch] = relative_error(got, ref)
                if not errors[batch] <= EXPORT_TOLERANCE:
                    raise ValueError(f"exported {fmt} differs from PyTorch at batch {batch}: relative error "
                                     f"{errors[batch]:.2e} > {EXPORT_TOLERANCE:g}")
    log.info("wrote %s (%s)%s", out, fmt, "".join(f", batch {b}: rel. error {e:.1e}" for b, e in errors.items()))
    return ExportReport(out, fmt, errors)
