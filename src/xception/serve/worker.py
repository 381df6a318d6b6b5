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
from concurrent.futures import ThreadPoolExecutor
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
    streams: int = 1  # threads that run a batch's images side by side (CPU), see StreamRunner
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


class StreamRunner:
    """Runs a batch through the model on ``streams`` threads at once, each with ``threads // streams``
    intra-op threads: the threads take the batch's images one at a time, in turn. A lone image
    runs whole on every thread (its latency stays that of one call on the worker's threads).
    Without streams (``streams=1``) the batch runs whole, padded to a bucket (:func:`run_padded`).

    Why: on a small CPU one batch spread over every core spends part of each layer waiting at the
    threads' barriers, and a large batch leaves the caches sooner; independent single-thread calls
    do neither. On the 2-core AVX2 machine, 299 px, one process, the same 16 images, 3 rounds each
    in turn: static int8 11.7 images/s as one batch on 2 threads, 14.0 / 14.2 / 13.6 / 13.6 on two
    single-thread streams taking parts of 1 / 2 / 4 / 8 images; fp32 eager 4.6, and 5.8 / 5.1 /
    4.7 / 4.6: parts of one image. Outputs are those of the images run alone.
    """

    def __init__(self, model: Any, buckets: list[int], *, streams: int = 1, threads: int = 1) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.model, self.buckets, self.streams = model, buckets, streams
        per_stream = max(1, threads // streams)
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="stream", initializer=torch.set_num_threads,
                                        initargs=(per_stream,)) if streams > 1 else None

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes the model is called with: every bucket for whole batches, else the one an
        image is padded to."""
        return list(self.buckets) if self._pool is None else list(self.buckets[:1])

    def _part(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread
            return run_padded(self.model, images, self.buckets)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._pool is None or images.shape[0] < 2:
            return run_padded(self.model, images, self.buckets)
        return torch.cat(list(self._pool.map(self._part, images.split(1))))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


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
        runner = StreamRunner(fast, buckets, streams=spec.streams, threads=spec.threads)
        for batch in runner.batch_sizes:  # warm every shape the model will see: compile / pack / trace now,
            for _ in range(2):  # not under load (TorchScript's executor specialises on the second run)
                fast(torch.zeros(batch, 3, size, size))
        runner(torch.zeros(spec.streams, 3, size, size))  # and the streams' threads
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
                probs = runner(images).float().softmax(dim=1)
            conn.send((batch_id, probs))
        except Exception as e:  # noqa: BLE001 - this batch fails, the worker stays
            conn.send((batch_id, f"{type(e).__name__}: {e}"))
