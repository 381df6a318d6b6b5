"""``xception serve``: the HTTP service, on Starlette and uvicorn, with dynamic batching.

    POST /predict   an image as the body (or a multipart field ``file``); ``?topk=N`` (default 5)
                    -> {"predictions": [{"label", "prob", "index"}, ...]}
    GET  /health    200 once a worker has loaded and warmed up the model, 503 before
    GET  /metrics   Prometheus text: requests by status, latency, batch sizes, queue depth

Every refusal is JSON ``{"error": "..."}`` naming the problem: 413 body over ``max_body_mb``;
400 empty, not an image, truncated, or over ``max_pixels``; 401 missing or wrong key (when one is
set; ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``); 503 with ``Retry-After`` when more than
``max_queue`` requests wait (at once) or while loading; 504 past ``timeout``; 500 if the model
itself fails; 503 if the worker running the request died (it is replaced). Images are decoded
and preprocessed in a thread pool of the server process, so a bad one never reaches a batch.

Use it in-process (``Service(...).app`` is an ASGI app: Starlette's TestClient, or any ASGI
server) or run it: ``Service(...).run(host, port)``, which SIGTERM stops gracefully: no new
connections, every accepted request answered, then the workers stop and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..data.images import UnreadableImage, open_image
from ..inference.classify import decode_predictions
from ..preprocessing import Preprocessing
from .batcher import Batcher, NotReady, QueueFull, WorkerDied
from .worker import WorkerSpec

log = logging.getLogger(__name__)

MB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs (the ``xception serve`` flags)."""

    weights: str
    device: str = "cpu"
    workers: int = 1
    max_batch_size: int = 16
    batch_timeout_ms: float = 10.0
    max_queue: int = 256
    max_body_mb: float = 20.0
    max_pixels: int = 50_000_000  # a decompression bomb (20000 x 20000) is refused before decoding
    timeout_s: float = 60.0
    api_key: str | None = None
    compile: bool | None = None
    threads: int | None = None  # per worker; default: the cores shared out
    streams: int | None = None  # per worker (CPU); default: one per thread (worker.StreamRunner)
    image_size: int | None = None
    crop_pct: float | None = None
    max_topk: int = 1000


class Service:
    """The service: ``app`` (ASGI) and ``run(host, port)``. See the module docstring."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        if config.streams is not None and config.streams < 1:
            raise ValueError(f"streams must be >= 1, got {config.streams}")
        threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
        streams = config.streams or (threads if torch.device(config.device).type == "cpu" else 1)
        spec = WorkerSpec(weights=config.weights, device=config.device, threads=threads, streams=streams,
                          max_batch_size=config.max_batch_size, compile=config.compile,
                          image_size=config.image_size, crop_pct=config.crop_pct)
        self.registry = CollectorRegistry()
        self.requests = Counter("xception_requests", "Requests answered, by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("xception_request_seconds", "Time to answer POST /predict", registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_sizes = Histogram("xception_batch_size", "Images per batch run", registry=self.registry,
                                     buckets=tuple(2 ** i for i in range(11)))
        self.queue_depth = Gauge("xception_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(lambda: self.batcher.queue_depth())
        self.batcher = Batcher(spec, workers=config.workers, max_batch_size=config.max_batch_size,
                               batch_timeout=config.batch_timeout_ms / 1000, max_queue=config.max_queue,
                               on_ready=self._on_ready, on_batch=self.batch_sizes.observe)
        self.class_names: list[str] = []
        self.transform = None
        self.url: str | None = None  # set by run(): printed once the model is ready
        self.app = self._build_app()

    # --- the app ------------------------------------------------------------------------------------

    def _build_app(self):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            await self.batcher.start()
            try:
                yield
            finally:
                await self.batcher.stop()

        async def not_found(request, exc):
            status = getattr(exc, "status_code", 404)
            text = "no such route" if status == 404 else "method not allowed" if status == 405 else str(exc.detail)
            self.requests.labels("other", str(status)).inc()
            return _error(status, f"{text}: {request.method} {request.url.path}")

        return Starlette(routes=[Route("/predict", self._predict, methods=["POST"]),
                                 Route("/health", self._health, methods=["GET"]),
                                 Route("/metrics", self._metrics, methods=["GET"])],
                         exception_handlers={StarletteHTTPException: not_found}, lifespan=lifespan)

    def _on_ready(self, info: dict) -> None:
        self.class_names = info["class_names"]
        self.transform = Preprocessing.from_dict(info["preprocessing"]).eval_transform()
        if self.url is not None:
            print(f"xception serve: {info['model']} ({info['path']}) ready at {self.url}", flush=True)

    async def _health(self, request):
        if self.batcher.ready:
            return JSONResponse({"status": "ok", "workers_ready": sum(w.ready for w in self.batcher.workers),
                                 "worker_pids": self.batcher.worker_pids(), "path": self.batcher.info["path"]})
        if self.batcher.failure:
            return _error(503, f"the model failed to load: {self.batcher.failure}")
        return _error(503, "loading the model", retry_after=1)

    async def _metrics(self, request):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _predict(self, request):
        start = time.perf_counter()
        response = await self._answer(request)
        self.requests.labels("predict", str(response.status_code)).inc()
        self.latency.observe(time.perf_counter() - start)
        return response

    async def _answer(self, request):
        refusal = self._check_key(request)
        if refusal is not None:
            return refusal
        try:
            topk = int(request.query_params.get("topk", "5"))
        except ValueError:
            return _error(400, f"topk must be an integer, got {request.query_params.get('topk')!r}")
        if not 1 <= topk <= self.config.max_topk:
            return _error(400, f"topk must be in 1..{self.config.max_topk}, got {topk}")
        if not self.batcher.ready:
            return _error(503, f"the model failed to load: {self.batcher.failure}" if self.batcher.failure
                          else "loading the model", retry_after=1)
        body = await self._read_body(request)
        if not isinstance(body, bytes):
            return body
        if self.batcher.queue_depth() >= self.config.max_queue:  # before decoding: shed load cheaply
            return _error(503, f"busy: {self.batcher.queue_depth()} requests waiting", retry_after=1)
        try:
            image = await asyncio.to_thread(self._preprocess, body)
        except UnreadableImage as e:
            return _error(400, str(e))
        try:
            probs = await asyncio.wait_for(self.batcher.submit(image), self.config.timeout_s)
        except QueueFull as e:
            return _error(503, f"busy: {e}", retry_after=1)
        except NotReady as e:
            return _error(503, str(e), retry_after=1)
        except WorkerDied as e:
            return _error(503, f"{e}; retry", retry_after=1)
        except TimeoutError:
            return _error(504, f"no answer within {self.config.timeout_s:g} s")
        except RuntimeError as e:
            log.error("the model failed: %s", e)
            return _error(500, f"the model failed on this request's batch: {e}")
        top = decode_predictions(probs[None], topk, self.class_names)[0]
        return JSONResponse({"predictions": [{"label": p.label, "prob": p.prob, "index": p.index} for p in top]})

    def _check_key(self, request):
        key = self.config.api_key
        if not key:
            return None
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not given:
            return _error(401, "missing API key (Authorization: Bearer KEY or X-API-Key: KEY)")
        if not hmac.compare_digest(given.encode(), key.encode()):
            return _error(401, "wrong API key")
        return None

    async def _read_body(self, request) -> Any:
        """The image's bytes (the body, or the multipart field ``file``), or the error response."""
        limit = int(self.config.max_body_mb * MB)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"body of {int(declared) / MB:.1f} MB is over the limit of {self.config.max_body_mb:g} MB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, f"body over the limit of {self.config.max_body_mb:g} MB")
            chunks.append(chunk)
        body = b"".join(chunks)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = await _multipart_file(request, body)
            if not isinstance(body, bytes):
                return body
        if not body:
            return _error(400, "empty body: send the image's bytes (or a multipart field 'file')")
        return body

    def _preprocess(self, body: bytes) -> torch.Tensor:
        return self.transform(open_image(body, "the uploaded image", max_pixels=self.config.max_pixels))

    # --- running it ---------------------------------------------------------------------------------

    def run(self, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0) -> None:
        """Serve until SIGTERM / SIGINT, then stop gracefully (``grace`` seconds at most)."""
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=grace, lifespan="on")
        _Server(config).run()


class _Server(uvicorn.Server):
    """uvicorn's server, but a stop signal ends in exit code 0 after the graceful shutdown (uvicorn
    raises the signal again once done, so the process would die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


async def _multipart_file(request, body: bytes) -> Any:
    """The bytes of the multipart field ``file`` in ``body``, or the error response."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - a malformed multipart body
        return _error(400, f"malformed multipart body: {e}")
    field = form.get("file")
    if not isinstance(field, UploadFile):
        return _error(400, "multipart body without a file field named 'file'")
    return await field.read()


def _error(status: int, message: str, retry_after: int | None = None):
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)
