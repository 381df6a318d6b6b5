"""Dynamic batching over a pool of inference worker processes.

Requests queue as preprocessed images. The batcher takes the first one waiting, waits for a free
worker, then gathers what else arrives within ``batch_timeout`` (up to ``max_batch_size``) and
sends the batch: under load, batches fill while workers are busy; alone, a request waits at most
``batch_timeout``. A worker that dies fails the batch it held (:class:`WorkerDied`, a 5xx to
those clients) and is started again; the others go on serving. When it was the last ready one,
the requests waiting for it fail at once too (:class:`NotReady`, a 503 with ``Retry-After``)
rather than wait out the new worker's start-up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.multiprocessing  # noqa: F401  (tensors cross the pipes through shared memory)

from .worker import WorkerSpec, worker_main

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than ``max_queue``: the caller should come back later."""


class WorkerDied(Exception):
    """The worker process holding a request's batch died before answering."""


class NotReady(Exception):
    """No worker has loaded the model yet (or every one failed)."""


@dataclass
class _Item:
    image: torch.Tensor
    future: asyncio.Future


@dataclass
class _Worker:
    index: int
    process: Any = None
    conn: Any = None
    ready: bool = False
    busy: dict[int, list[_Item]] = field(default_factory=dict)  # batch id -> its items
    pid: int | None = None


class Batcher:
    """Collects single images into batches and runs them on ``workers`` processes.

    Args:
        spec: what every worker loads (:class:`~.worker.WorkerSpec`).
        workers: inference processes (each holds the model once).
        max_batch_size, batch_timeout: the largest batch, and how long the first request of a
            batch waits for others (seconds).
        max_queue: requests allowed to wait; one more raises :class:`QueueFull` at once.
        on_ready: called once with the first worker's ``info`` (class names, preprocessing, path).
        on_batch: called with each batch's size (metrics).
    """

    def __init__(self, spec: WorkerSpec, *, workers: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.01,
                 max_queue: int = 256, on_ready: Callable[[dict], None] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if workers < 1 or max_batch_size < 1 or max_queue < 1 or batch_timeout < 0:
            raise ValueError(f"workers, max_batch_size and max_queue must be >= 1 and batch_timeout >= 0, got "
                             f"{workers}, {max_batch_size}, {max_queue}, {batch_timeout}")
        self.spec, self.max_batch_size, self.batch_timeout, self.max_queue = spec, max_batch_size, batch_timeout, max_queue
        self.on_ready, self.on_batch = on_ready, on_batch
        self.workers = [_Worker(i) for i in range(workers)]
        self.info: dict | None = None
        self.failure: str | None = None  # why no worker could start, if none could
        self._ctx = multiprocessing.get_context("spawn")
        self._ids = itertools.count()
        self._queue: asyncio.Queue[_Item] | None = None
        self._free: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._gathering: list[_Item] = []  # taken from the queue, waiting for a free worker
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers (they load in the background) and the batching loop."""
        self._loop = asyncio.get_running_loop()
        self._queue, self._free = asyncio.Queue(), asyncio.Condition()
        for worker in self.workers:
            self._spawn(worker)
        self._task = asyncio.create_task(self._run(), name="xception-batcher")

    async def stop(self, grace: float = 10.0) -> None:
        """Answer what is queued or running (up to ``grace`` seconds), then stop every worker."""
        deadline = self._loop.time() + grace
        while (self._queue.qsize() or any(w.busy for w in self.workers)) and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        for worker in self.workers:
            await asyncio.to_thread(self._stop_worker, worker)
        for item in self._drain():
            _fail(item, WorkerDied("the service stopped before answering"))

    @property
    def ready(self) -> bool:
        return any(w.ready for w in self.workers)

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def worker_pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]

    # --- requests -------------------------------------------------------------------------------

    async def submit(self, image: torch.Tensor) -> torch.Tensor:
        """The class probabilities of one preprocessed (3, S, S) image; raises :class:`QueueFull`,
        :class:`NotReady`, :class:`WorkerDied` or ``RuntimeError`` (the model failed)."""
        if not self.ready:
            raise NotReady(self.failure or "the model is still loading")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are waiting (--max-queue {self.max_queue})")
        item = _Item(image, self._loop.create_future())
        self._queue.put_nowait(item)
        return await item.future

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = self._gathering = [first]
            worker = await self._free_worker()
            deadline = self._loop.time() + self.batch_timeout
            while len(batch) < self.max_batch_size:
                remaining = deadline - self._loop.time()
                try:
                    batch.append(self._queue.get_nowait() if remaining <= 0 else
                                 await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            self._gathering = []
            batch = [item for item in batch if not item.future.done()]  # a client that gave up, or failed
            if batch:
                self._send(worker, batch)

    async def _free_worker(self) -> _Worker:
        async with self._free:
            while True:
                for worker in self.workers:
                    if worker.ready and not worker.busy:
                        return worker
                await self._free.wait()

    def _send(self, worker: _Worker, batch: list[_Item]) -> None:
        batch_id = next(self._ids)
        worker.busy[batch_id] = batch
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            worker.conn.send((batch_id, torch.stack([item.image for item in batch])))
        except (OSError, ValueError):  # the worker died between batches: its reader restarts it
            pass

    # --- workers ------------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        parent, child = self._ctx.Pipe()
        worker.process = self._ctx.Process(target=worker_main, args=(child, self.spec), daemon=True,
                                           name=f"xception-worker-{worker.index}")
        worker.process.start()
        child.close()
        worker.conn, worker.ready, worker.pid = parent, False, worker.process.pid
        threading.Thread(target=self._read, args=(worker, parent), daemon=True,
                         name=f"xception-reader-{worker.index}").start()

    def _read(self, worker: _Worker, conn: Any) -> None:
        """A thread per worker: hands each answer to the event loop; on EOF, the worker died."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._died, worker, conn)
                return
            self._loop.call_soon_threadsafe(self._answer, worker, message)

    def _answer(self, worker: _Worker, message: tuple) -> None:
        key, value = message
        if key == "ready":
            worker.ready = True
            if self.info is None:
                self.info = value
                if self.on_ready is not None:
                    self.on_ready(value)
            log.info("worker %d (pid %s) ready: %s", worker.index, value["pid"], value["path"])
        elif key == "failed":
            self.failure = value
            log.error("worker %d failed to start: %s", worker.index, value)
        else:
            items = worker.busy.pop(key, [])
            if isinstance(value, str):  # the model raised on this batch
                for item in items:
                    _fail(item, RuntimeError(value))
            else:
                for item, probs in zip(items, value):
                    if not item.future.done():
                        item.future.set_result(probs)
        self._notify_free()

    def _died(self, worker: _Worker, conn: Any) -> None:
        if conn is not worker.conn or self._stopping:
            return
        held = [item for items in worker.busy.values() for item in items]
        worker.busy.clear()
        worker.ready = False
        for item in held:
            _fail(item, WorkerDied(f"worker {worker.index} (pid {worker.pid}) died while running this request"))
        if self.failure is not None and self.info is None:
            return  # it never started: the service reports why instead of restarting it forever
        log.warning("worker %d (pid %s) died with %d request(s) in hand: starting another", worker.index,
                    worker.pid, len(held))
        self._spawn(worker)
        if not self.ready:  # nothing can answer before the new worker has loaded the model
            waiting = self._gathering + self._drain()
            for item in waiting:
                _fail(item, NotReady("the inference worker is being restarted; retry"))
            if waiting:
                log.warning("failed %d waiting request(s) with 503 while the worker restarts", len(waiting))

    def _notify_free(self) -> None:
        async def notify() -> None:
            async with self._free:
                self._free.notify_all()

        asyncio.ensure_future(notify())

    def _stop_worker(self, worker: _Worker) -> None:
        if worker.process is None:
            return
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()

    def _drain(self) -> list[_Item]:
        items = []
        while self._queue is not None and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items


def _fail(item: _Item, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
