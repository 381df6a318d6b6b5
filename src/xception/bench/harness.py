"""``xception bench``: images/s and latency of our inference paths against the engines people
deploy Xception with (timm eager and compiled, ONNX Runtime fp32 and int8, OpenVINO default,
f32 and int8; :mod:`.peers`).

Every candidate (each of our modes, each peer mode) is built and warmed up first (compile time
reported separately), then timed in interleaved rounds — round r times every candidate in turn —
so that a change in machine load hits all of them alike. Latency is per call (device events on
CUDA, the host clock after a synchronize otherwise); images/s is batch / median latency.

Peers share our weights where the architecture matches (timm's ``legacy_xception`` has our
state-dict keys), so each result also carries its relative error against our fp32 eager model
on the benchmark input. The int8 peers are calibrated on the same images (``calibration``
random images of the benchmark's shape, seeded; our int8 path needs none). A missing peer (not
installed, other architecture) is reported in the results with an ``error`` and never stops the
run. The report names the best of ours and of the peers overall and among the int8 paths.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..deploy import kernels as cpu_kernels
from ..deploy.cpu import cpu_flags, cpu_has_int8_dot, cpu_has_native_bf16
from ..deploy.optimize import optimize
from ..deploy.parity import TOLERANCE, relative_error
from ..models.registry import build_model
from ..preprocessing import Preprocessing
from ..weights import load_pretrained
from .peers import PEER_CANDIDATES

log = logging.getLogger(__name__)

PEERS = tuple(PEER_CANDIDATES)
OUR_MODES = ("eager", "compile")
# Our precisions timed when none are given: the fast ones for the device.
# "int8": static int8 calibrated on the same images as the int8 peers; "int8-dynamic": the
# no-calibration form (int8 1x1 convs with per-pixel scales, bf16 elsewhere).
BENCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8-dynamic")


def default_precisions(device: torch.device) -> list[str]:
    """CUDA: bf16. CPU: bf16 where it is native (else fp32, as oneDNN's emulated bf16 is far
    slower), static int8, and dynamic int8 where the CPU has int8 dot-product instructions."""
    if device.type != "cpu":
        return ["bf16"]
    flags = cpu_flags()
    return (["bf16" if cpu_has_native_bf16(flags) else "fp32", "int8"]
            + (["int8-dynamic"] if cpu_has_int8_dot(flags) else []))


@dataclass
class Result:
    impl: str  # "ours" | "timm" | "onnxruntime" | "openvino"
    mode: str
    precision: str | None = None  # "fp32" | "bf16" | "fp16" | "int8" | "default" (the engine's choice)
    images_per_s: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    compile_s: float | None = None
    rel_error: float | None = None  # against our fp32 eager model, same input
    parity_ok: bool | None = None
    error: str | None = None


@dataclass
class _Candidate:
    result: Result
    run: Callable[[torch.Tensor], torch.Tensor]
    latencies: list[float] = field(default_factory=list)


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """Give every batch norm random affine parameters and running statistics (in place).

    Freshly built models have identity batch norms, which would hide a wrong fold in tests.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            dev = m.running_mean.device
            r = lambda: torch.rand(n, generator=generator).to(dev)  # noqa: E731
            m.running_mean.copy_((torch.randn(n, generator=generator) * 0.1).to(dev))
            m.running_var.copy_(0.5 + 1.5 * r())
            if m.weight is not None:
                m.weight.copy_(0.5 + r())
                m.bias.copy_((torch.randn(n, generator=generator) * 0.1).to(dev))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable, x: torch.Tensor, device: torch.device) -> float:
    """Seconds for one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Candidates


def _ours(model: nn.Module, device: torch.device, precisions: list[str], modes: list[str],
          shape: tuple[int, ...], cuda_graphs: bool,
          calibration: list[torch.Tensor]) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    out = []
    for name in precisions:  # int8 on CUDA: optimize() refuses it, reported as that row's error
        if name == "int8":  # static: one row, whatever the modes
            # a file `xception quantize` wrote runs its own calibration; other models the shared images
            own = getattr(model, "int8_calibration", None) is not None
            out.append(("static-int8" + ("-file" if own else ""), "int8", lambda: optimize(
                model, device=device, dtype="int8", calibration=None if own else calibration, example_shape=shape)))
            continue
        precision = "int8" if name == "int8-dynamic" else name
        for mode in modes:
            label = f"{mode}-{name}-channels_last"
            out.append((label, precision, lambda d=precision, m=mode: optimize(
                model, device=device, dtype=d, mode=m, example_shape=shape)))
            if cuda_graphs and device.type == "cuda":
                out.append((label + "-cudagraphs", precision, lambda d=precision, m=mode: optimize(
                    model, device=device, dtype=d, mode=m, cuda_graphs=True, example_shape=shape)))
    return out


# ---------------------------------------------------------------------------------------------


def run_bench(
    *,
    model_name: str | None = "xception",
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 1,
    image_size: int | None = None,
    dtypes: list[str] | None = None,
    modes: list[str] | None = None,
    compare: list[str] | None = None,
    cuda_graphs: bool | None = None,
    warmup: int = 3,
    repeats: int = 5,
    min_round_s: float = 0.5,
    seed: int = 0,
    threads: int | None = None,
    model_kwargs: dict | None = None,
    calibration: int = 16,
    compile_peers: bool = True,
) -> dict:
    """Benchmark our modes and the peers; return the JSON-ready report (see module docstring).

    Args:
        model_name: the model; with ``weights``, None takes the one the file records.
        weights: the user's weights (``"keras"``, ``"timm"``, a file, a checkpoint): their batch-norm
            statistics, and their preprocessing's image size unless ``image_size`` is given. Default:
            random weights with random batch-norm statistics.
        dtypes: our precisions, among :data:`BENCH_PRECISIONS` (``"int8"``: static, calibrated on
            the int8 peers' images; ``"int8-dynamic"``: no calibration); default
            :func:`default_precisions` for the device.
        modes: our modes among :data:`OUR_MODES`; default all that apply to the device.
        compare: peers among :data:`PEERS`; default all.
        cuda_graphs: also time our eager and compile modes through CUDA graphs; default on CUDA for
            batch <= 8.
        repeats: timing rounds; each round times every candidate for at least ``min_round_s``.
        threads: CPU threads for every candidate (PyTorch, ONNX Runtime, OpenVINO alike); default as is.
        calibration: images our static int8 path and the int8 peers are calibrated on.
        compile_peers: include the peers' ``torch.compile`` modes (minutes of compiling on a small CPU).
    """
    dev = torch.device(device)
    model = load_pretrained(model_name, weights, **(model_kwargs or {})) if weights is not None else None
    if image_size is None:
        image_size = (model.preprocessing if model is not None else Preprocessing()).image_size
    precisions, modes, compare = _check_options(dev, batch_size, image_size, repeats, threads, dtypes, modes, compare)
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda" and batch_size <= 8
    if threads is not None:
        torch.set_num_threads(threads)

    torch.manual_seed(seed)
    if model is None:
        model = build_model(model_name or "xception", **(model_kwargs or {}))
        randomize_batchnorm_(model, generator=torch.Generator().manual_seed(seed))
    model.eval()
    shape = (batch_size, getattr(model.config, "in_chans", 3), image_size, image_size)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = [torch.randn(shape, generator=gen) for _ in range(2)]
    calib = [torch.randn((1, *shape[1:]), generator=gen) for _ in range(calibration)]
    with torch.no_grad():
        reference = model(inputs[0]).float()  # fp32 eager on the CPU: the function to match
    dev_inputs = [x.to(dev) for x in inputs]

    builders = [("ours", label, precision, build)
                for label, precision, build in _ours(model, dev, precisions, modes, shape, cuda_graphs, calib)]
    peer_builders, failed = _peer_builders(model, dev, shape, calib, compare, compile_peers)
    candidates, broken = _build_candidates(builders + peer_builders, dev, dev_inputs[0], reference, warmup)
    _time_rounds(candidates, dev_inputs, dev, repeats, min_round_s)
    results = [_timed_result(c, batch_size) for c in candidates] + failed + broken
    return {
        "device": _device_name(dev),
        "model": model.model_name,
        "weights": None if weights is None else str(weights),
        "batch_size": batch_size,
        "image_size": image_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "repeats": repeats,
        "calibration_images": calibration,
        # what ran our static int8 rows: our CPU kernels, or PyTorch's quantized kernels (and why)
        "int8_kernels": (None if not any(r.impl == "ours" and r.mode.startswith("static-int8") for r in results)
                         else "ours" if cpu_kernels.load() else f"pytorch ({cpu_kernels.unavailable_reason()})"),
        "results": [asdict(r) for r in results],
        **_bests(results),
    }


def _check_options(dev: torch.device, batch_size: int, image_size: int, repeats: int, threads: int | None,
                   dtypes: list[str] | None, modes: list[str] | None,
                   compare: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """Our precisions, our modes and the peers to run (defaults filled in); a ValueError names a bad one."""
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if batch_size < 1 or image_size < 1 or repeats < 1:
        raise ValueError(f"batch size, image size and repeats must be >= 1, got {batch_size}, {image_size}, {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    precisions = list(dtypes or default_precisions(dev))
    for d in precisions:
        if d not in BENCH_PRECISIONS:
            raise ValueError(f"dtype must be among {', '.join(BENCH_PRECISIONS)}, got {d!r}")
    modes = list(modes or OUR_MODES)
    for m in modes:
        if m not in OUR_MODES:
            raise ValueError(f"mode must be among {', '.join(OUR_MODES)}, got {m!r}")
    compare = list(PEERS if compare is None else compare)
    for p in compare:
        if p not in PEERS:
            raise ValueError(f"--compare takes {', '.join(PEERS)}, got {p!r}")
    return precisions, modes, compare


def _peer_builders(model: nn.Module, dev: torch.device, shape: tuple[int, ...], calib: list[torch.Tensor],
                   compare: list[str], compile_peers: bool) -> tuple[list[tuple[str, str, str, Callable]], list[Result]]:
    """Each peer's candidates, and a failed result for each peer that cannot run here (not installed,
    another architecture): a missing peer never stops the benchmark."""
    builders, failed = [], []
    for peer in compare:
        try:
            for label, precision, build in PEER_CANDIDATES[peer](model, dev, shape, calib):
                if compile_peers or not label.startswith("compile"):
                    builders.append((peer, label, precision, build))
        except (ImportError, ValueError, RuntimeError) as e:
            log.warning("peer %s unavailable: %s", peer, e)
            failed.append(Result(peer, "-", error=f"{type(e).__name__}: {e}"))
    return builders, failed


def _build_candidates(builders: list[tuple[str, str, str, Callable]], dev: torch.device, x: torch.Tensor,
                      reference: torch.Tensor, warmup: int) -> tuple[list[_Candidate], list[Result]]:
    """Build and warm up every candidate, and measure its error against ``reference`` on ``x``;
    one that fails is a result with its error, and the others go on."""
    candidates, failed = [], []
    for impl, label, precision, build in builders:
        res = Result(impl, label, precision)
        log.info("building %s %s", impl, label)
        try:
            built = build()
            if impl == "ours":
                run, res.compile_s = built, built.compile_seconds
            else:
                run, res.compile_s = built
            for _ in range(warmup):
                run(x)
            _sync(dev)
            with torch.no_grad():
                res.rel_error = relative_error(run(x).float().cpu(), reference)
            if impl == "ours":
                res.parity_ok = res.rel_error <= TOLERANCE[built.precision]
            candidates.append(_Candidate(res, run))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the benchmark
            log.warning("%s %s failed: %s", impl, label, e)
            res.error = f"{type(e).__name__}: {e}"
            failed.append(res)
    return candidates, failed


def _time_rounds(candidates: list[_Candidate], inputs: list[torch.Tensor], dev: torch.device, repeats: int,
                 min_round_s: float) -> None:
    """Interleaved rounds: round r times every candidate in turn for at least ``min_round_s``, so a
    change in machine load hits all of them alike."""
    for r in range(repeats):
        for k, cand in enumerate(candidates):
            start = time.perf_counter()
            while True:
                cand.latencies.append(_time_call(cand.run, inputs[(r + k) % 2], dev))
                if time.perf_counter() - start >= min_round_s:
                    break
        log.info("round %d/%d done", r + 1, repeats)


def _timed_result(cand: _Candidate, batch_size: int) -> Result:
    lat = torch.tensor(cand.latencies, dtype=torch.float64)
    p50 = lat.median().item()
    cand.result.latency_ms_p50 = p50 * 1e3
    cand.result.latency_ms_p95 = torch.quantile(lat, 0.95).item() * 1e3
    cand.result.images_per_s = batch_size / p50
    return cand.result


def _bests(results: list[Result]) -> dict:
    """The fastest of ours and of the peers (those within parity), overall and among the int8 paths,
    and the ratios between them."""
    def best(ours: bool, precision: str | None = None) -> dict | None:
        ok = [r for r in results if (r.impl == "ours") == ours and r.images_per_s is not None
              and r.parity_ok is not False and precision in (None, r.precision)]
        top = max(ok, key=lambda r: r.images_per_s, default=None)
        return None if top is None else {"impl": top.impl, "mode": top.mode, "images_per_s": top.images_per_s,
                                         "rel_error": top.rel_error}

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return None if a is None or b is None else a["images_per_s"] / b["images_per_s"]

    best_ours, best_peer = best(True), best(False)
    best_ours_int8, best_peer_int8 = best(True, "int8"), best(False, "int8")
    return {"best_ours": best_ours, "best_peer": best_peer, "speedup": ratio(best_ours, best_peer),
            "best_ours_int8": best_ours_int8, "best_peer_int8": best_peer_int8,
            "int8_speedup": ratio(best_ours_int8, best_peer_int8)}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        driver = getattr(torch.version, "cuda", None)
        return f"cuda: {name} (CUDA {driver})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    extras = [name for name, has in (("native bf16", cpu_has_native_bf16(flags)), ("int8 dot", cpu_has_int8_dot(flags)))
              if has] or ["no native bf16, no int8 dot"]
    return (f"cpu: {cpu}, {os.cpu_count()} logical cores, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{', '.join(extras)}")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("timm", "onnxruntime", "openvino", "nncf", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def format_table(report: dict) -> str:
    """The report as a plain-text table, fastest first."""
    rows = sorted(report["results"], key=lambda r: -(r["images_per_s"] or -1))
    peer = (report["best_peer"] or {}).get("images_per_s")
    lines = [f"{report['device']} | {report['model']} batch {report['batch_size']} "
             f"{report['image_size']}x{report['image_size']}",
             f"{'impl':<12} {'mode':<34} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'vs peer':>8} "
             f"{'compile s':>9} {'rel.err':>8}"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['impl']:<12} {r['mode']:<34} unavailable: {r['error']}")
            continue
        ratio = f"{r['images_per_s'] / peer:.2f}x" if peer else "-"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        err = f"{r['rel_error']:.1e}" if r["rel_error"] is not None else "-"
        flag = "" if r["parity_ok"] is not False else "  PARITY FAILED"
        lines.append(f"{r['impl']:<12} {r['mode']:<34} {r['images_per_s']:>9.2f} {r['latency_ms_p50']:>9.2f} "
                     f"{r['latency_ms_p95']:>9.2f} {ratio:>8} {comp:>9} {err:>8}{flag}")
    for key, what in (("speedup", ""), ("int8_speedup", " int8")):
        if report.get(key) is not None:
            ours, peer = report[f"best_ours{what.replace(' ', '_')}"], report[f"best_peer{what.replace(' ', '_')}"]
            lines.append(f"best ours{what} {ours['mode']} / best peer{what} {peer['impl']} {peer['mode']}: "
                         f"{report[key]:.2f}x")
    return "\n".join(lines)
