"""The inference worker: a process that loads the model on the fastest path for its device and
answers batches sent over a pipe, until the pipe closes.

Messages, parent -> worker: ``(batch_id, images)`` with ``images`` a (B, 3, S, S) float tensor
(shared memory, through torch's multiprocessing reductions), or ``None`` to stop. Worker ->
parent: ``("ready", info)`` once, after loading and warming up; then ``(batch_id, probs)`` with a
(B, C) float tensor, or ``(batch_id, "error text")``; ``("failed", text)`` if it cannot start.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker loads and how it runs it."""

    weights: str
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    threads: int = 1  # intra-op threads (CPU)
    max_batch_size: int = 16
    compile: bool | None = None  # None: on CUDA only (minutes of compiling on a small CPU)
    image_size: int | None = None
    crop_pct: float | None = None


def fastest_path(model: torch.nn.Module, device: torch.device, compile: bool | None) -> tuple[torch.nn.Module, str]:
    """The model on the fastest path its weights and device allow, and a name for it: static int8
    when it carries a calibration (``xception quantize``) on a CPU, else bf16 on CUDA (compiled)
    and on CPUs with native bf16, else fp32; batch norms folded, channels-last."""
    from ..deploy.cpu import cpu_has_native_bf16
    from ..deploy.optimize import optimize

    if getattr(model, "int8_calibration", None) is not None and device.type == "cpu":
        return optimize(model, device="cpu", dtype="int8"), "static int8"
    dtype = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    compiled = device.type == "cuda" if compile is None else compile
    mode = "compile" if compiled else "eager"
    return optimize(model, device=device, dtype=dtype, mode=mode), f"{mode} {dtype}"


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a worker runs: powers of two up to ``max_batch_size``, and that. A batch is
    padded to the next one, so the compiled or traced graphs (one per input shape) stay few and are
    all built at start-up, instead of one per batch size met under load."""
    return sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size} | {max_batch_size})


def run_padded(model: torch.nn.Module, images: torch.Tensor, buckets: list[int]) -> torch.Tensor:
    """``model(images)``, the batch zero-padded to the next bucket size and the padding cut off."""
    n = images.shape[0]
    size = next((b for b in buckets if b >= n), n)
    if size > n:
        images = torch.cat([images, images.new_zeros(size - n, *images.shape[1:])])
    return model(images)[:n]


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """The worker process's body (started with the ``spawn`` method). Stop signals are the
    parent's to handle: it finishes the batches in flight, then closes the pipe."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.threads))
    torch.set_num_threads(spec.threads)
    try:
        from ..inference.classify import load_model

        device = torch.device(spec.device)
        model = load_model(spec.weights, device="cpu", image_size=spec.image_size, crop_pct=spec.crop_pct, int8=False)
        fast, path = fastest_path(model, device, spec.compile)
        buckets = batch_buckets(spec.max_batch_size)
        if hasattr(fast.module, "MAX_FROZEN_SHAPES"):  # static int8 keeps a traced graph per shape: one per bucket
            fast.module.MAX_FROZEN_SHAPES = len(buckets)
        size = model.preprocessing.image_size
        for batch in buckets:  # warm every shape a batch can take: compile / pack / trace now, not under load
            fast(torch.zeros(batch, 3, size, size))
        conn.send(("ready", {"class_names": list(model.class_names), "preprocessing": model.preprocessing.to_dict(),
                             "path": path, "model": model.model_name, "pid": os.getpid()}))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names it and stops
        conn.send(("failed", f"{spec.weights}: {type(e).__name__}: {e}"))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        batch_id, images = message
        try:
            with torch.no_grad():
                probs = run_padded(fast, images, buckets).float().softmax(dim=1)
            conn.send((batch_id, probs))
        except Exception as e:  # noqa: BLE001 - this batch fails, the worker stays
            conn.send((batch_id, f"{type(e).__name__}: {e}"))
