"""The engines people deploy Xception with, as ``xception bench`` candidates, on our weights.

* timm (``legacy_xception``, or timm's model of the same name for the aligned family): eager in
  fp32/bf16, NCHW and channels-last, and bf16 channels-last under ``torch.compile`` with
  Inductor freezing (with and without freezing on CUDA).
* ONNX Runtime on timm's ONNX export: fp32, and int8 (static QDQ, per-channel weights, uint8
  activations, MinMax-calibrated on the benchmark's calibration images).
* OpenVINO on timm's model: its default precision (bf16 on CPUs with AMX/AVX-512 bf16) with the
  latency hint, f32, and int8 quantized by NNCF on the same calibration images (CPU only).

Each ``*_candidates(model, device, shape, calibration)`` returns ``(label, precision, build)``
triples; ``build()`` returns ``(run, compile_seconds)``. A peer that is not installed raises
:class:`~xception.extras.MissingExtra` naming the ``bench`` extra; the benchmark reports it as a
row and carries on.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Callable, TypeVar

import torch
from torch import nn

from ..extras import require
from ..deploy.cpu import cpu_has_native_bf16

T = TypeVar("T")
Runner = Callable[[torch.Tensor], torch.Tensor]
Candidate = tuple[str, str, Callable[[], tuple[Runner, float | None]]]

# Our models and timm's with the same architecture and state-dict keys.
TIMM_MIDDLE_BLOCKS = 8  # legacy_xception's, fixed (block4 ... block11)
TIMM_PEERS = {"xception": "legacy_xception",
              **{n: n for n in ("xception41", "xception65", "xception71", "xception41p", "xception65p")}}


def timm_model(model: nn.Module) -> nn.Module:
    """timm's model of ``model``'s architecture with ``model``'s weights, in eval mode."""
    timm = require("timm", "bench", "the timm peer")
    name = getattr(model, "model_name", None)
    if name not in TIMM_PEERS:
        raise ValueError(f"timm has no model with the architecture of {name or type(model).__name__!r}")
    cfg = model.config
    kwargs = {"num_classes": cfg.num_classes, "in_chans": cfg.in_chans}
    if name != "xception" and cfg.output_stride != 32:
        kwargs["output_stride"] = cfg.output_stride
    peer = timm.create_model(TIMM_PEERS[name], pretrained=False, **kwargs)
    state = model.state_dict()
    if name == "xception" and cfg.middle_blocks < TIMM_MIDDLE_BLOCKS:
        # fewer middle blocks: timm's surplus ones pass their input through, our exit block is its block12
        exit_block = f"block{4 + cfg.middle_blocks}."
        state = {("block12." + k[len(exit_block):]) if k.startswith(exit_block) else k: v for k, v in state.items()}
        for i in range(4 + cfg.middle_blocks, 4 + TIMM_MIDDLE_BLOCKS):
            setattr(peer, f"block{i}", nn.Identity())
    try:
        peer.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"this model's weights do not fit timm {TIMM_PEERS[name]} (config {cfg})") from e
    return peer.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_candidates(model: nn.Module, device: torch.device, shape: tuple[int, ...],
                    calibration: list[torch.Tensor]) -> list[Candidate]:
    peer = timm_model(model)
    # (dtype, channels_last, torch.compile mode or None, Inductor freezing)
    modes = [(torch.float32, False, None, False), (torch.float32, True, None, False),
             (torch.bfloat16, False, None, False), (torch.bfloat16, True, None, False),
             (torch.bfloat16, True, "default", True)]
    if device.type == "cpu" and not cpu_has_native_bf16():
        # oneDNN emulates bf16 here (~24x slower than fp32 when measured): a user compiles in fp32
        modes = [(torch.float32, False, None, False), (torch.float32, True, None, False),
                 (torch.float32, True, "default", True)]
    if device.type == "cuda":
        # without freezing, and with Inductor's CUDA graphs (what a user picks for batch-1 latency)
        modes += [(torch.bfloat16, True, "default", False), (torch.bfloat16, True, "reduce-overhead", False)]
    out: list[Candidate] = []
    for dtype, cl, comp, freeze in modes:
        precision = "fp32" if dtype == torch.float32 else "bf16"
        kind = {None: "eager", "default": "compile", "reduce-overhead": "compile-cudagraphs"}[comp]
        label = f"{kind}{'-freezing' if freeze else ''}-{precision}-{'channels_last' if cl else 'nchw'}"

        def build(dtype=dtype, cl=cl, comp=comp, freeze=freeze):
            import torch._inductor.config as inductor_config

            fmt = torch.channels_last if cl else torch.contiguous_format
            m = copy.deepcopy(peer).to(device=device, dtype=dtype, memory_format=fmt)
            fn = torch.compile(m, mode=comp) if comp else m

            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad(), inductor_config.patch(freezing=freeze):
                    y = fn(x.to(device, dtype).contiguous(memory_format=fmt))
                # Inductor's CUDA graphs reuse their output buffer on the next replay
                return y.clone() if comp == "reduce-overhead" else y
            start = time.perf_counter()
            for _ in range(3 if comp == "reduce-overhead" else 1):  # graphs are recorded on the 2nd/3rd call
                run(torch.randn(shape, device=device))
            _sync(device)
            return run, (time.perf_counter() - start if comp else None)
        out.append((label, precision, build))
    return out


def _once(make: Callable[[], T]) -> Callable[[], tuple[T, float]]:
    """``make()`` run on the first call only; every call returns its result and the seconds it took.

    Candidates of one engine share their conversion (one ONNX export, one OpenVINO model); each
    adds those seconds to its own build time, as if it had converted alone."""
    done: list[tuple[T, float]] = []

    def get() -> tuple[T, float]:
        if not done:
            start = time.perf_counter()
            value = make()
            done.append((value, time.perf_counter() - start))
        return done[0]
    return get


def _onnx_bytes(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The ONNX export of the timm twin of ``model``, its weights inside (one buffer, no data file)."""
    import onnx

    from ..deploy.export import export_model

    with tempfile.TemporaryDirectory(prefix="xception-bench-") as folder:
        path = os.path.join(folder, "peer.onnx")
        export_model(timm_model(model), "onnx", path, image_size=shape[-1], check=False, fold=False)
        return onnx.load(path).SerializeToString()  # reads the exporter's external data file too


def ort_candidates(model: nn.Module, device: torch.device, shape: tuple[int, ...],
                   calibration: list[torch.Tensor]) -> list[Candidate]:
    ort = require("onnxruntime", "bench", "the ONNX Runtime peer")
    on_cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()

    exported = _once(lambda: _onnx_bytes(model, shape))

    def session(path: str | bytes) -> Runner:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        providers = (["CUDAExecutionProvider"] if on_cuda else []) + ["CPUExecutionProvider"]
        sess = ort.InferenceSession(path, opts, providers=providers)
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.detach().float().cpu().numpy()})[0])

    def build_fp32():
        onnx, export_s = exported()
        start = time.perf_counter()
        run = session(onnx)
        run(torch.randn(shape))
        return run, export_s + time.perf_counter() - start

    def build_int8():
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)

        onnx, export_s = exported()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="xception-bench-") as folder:
            fp32 = os.path.join(folder, "peer.onnx")
            with open(fp32, "wb") as f:
                f.write(onnx)
            name = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).get_inputs()[0].name

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.items = iter([{name: x.float().numpy()} for x in calibration])

                def get_next(self):
                    return next(self.items, None)

            prepared = fp32.replace(".onnx", ".prep.onnx")
            quant_pre_process(fp32, prepared)
            int8 = fp32.replace(".onnx", ".int8.onnx")
            quantize_static(prepared, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            run = session(int8)
        run(torch.randn(shape))
        return run, export_s + time.perf_counter() - start

    where = "cuda" if on_cuda else "cpu"
    out: list[Candidate] = [(f"fp32-{where}", "fp32", build_fp32)]
    if not on_cuda:
        out.append(("int8-static-qdq-per-channel-cpu", "int8", build_int8))
    return out


def openvino_candidates(model: nn.Module, device: torch.device, shape: tuple[int, ...],
                        calibration: list[torch.Tensor]) -> list[Candidate]:
    ov = require("openvino", "bench", "the OpenVINO peer")
    if device.type != "cpu":
        raise ValueError(f"the OpenVINO peer runs on the CPU, not {device.type}")
    core = ov.Core()
    threads = str(torch.get_num_threads())

    def compiled(ov_model, config: dict[str, str]) -> Runner:
        net = core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                   **config})
        request = net.create_infer_request()
        return lambda x: torch.from_numpy(request.infer([x.detach().float().cpu().numpy()])[0].copy())

    converted = _once(lambda: ov.convert_model(timm_model(model), example_input=torch.randn(shape)))

    def build(config: dict[str, str], quantize: bool = False):
        def make():
            shared, convert_s = converted()
            start = time.perf_counter()
            ov_model = shared.clone()  # NNCF and compilation leave it as it was, but do not rely on that
            if quantize:
                nncf = require("nncf", "bench", "the OpenVINO int8 peer")
                data = nncf.Dataset([x.float().numpy() for x in calibration])
                ov_model = nncf.quantize(ov_model, data, subset_size=len(calibration))
            run = compiled(ov_model, config)
            run(torch.randn(shape))
            return run, convert_s + time.perf_counter() - start
        return make

    return [("default-latency-cpu", "default", build({})),
            ("f32-latency-cpu", "fp32", build({"INFERENCE_PRECISION_HINT": "f32"})),
            ("int8-nncf-latency-cpu", "int8", build({}, quantize=True))]


PEER_CANDIDATES = {"timm": timm_candidates, "onnxruntime": ort_candidates, "openvino": openvino_candidates}
