"""The batching peer: NVIDIA Triton Inference Server (the ``tritonserver`` binary that the
``nvidia-pytriton`` wheel ships) with its dynamic batcher, serving the same model on the same
fastest path as ``xception serve``.

    python benchmarks/serve_peers/triton_peer.py WEIGHTS PORT [INSTANCES]   # with the Triton env's python

INSTANCES (default 1): model instances in Triton's instance group, each running its batches on its
own thread with cores / INSTANCES intra-op threads: Triton's way to run batches side by side, the
peer of ``xception serve``'s streams (``serve_load.py --triton-instances``).

Layout (all in this process's tree, so serve_load.py sees every process's memory):

    client --POST /predict (image bytes)--> front (aiohttp, PORT): decode + preprocess on a thread pool
           --KServe v2 HTTP infer, one (1, 3, S, S) float tensor--> tritonserver (dynamic batcher:
           max batch 16, max queue delay 10 ms) --python backend stub--> PyTriton's proxy --> ``infer``
           (below, in this process): the batch through ``fastest_path`` (static int8 when the weights
           carry a calibration), padded to the same power-of-two buckets as our worker.

Why a front: Triton's HTTP API takes tensors, not image files. Decoding happens where ``xception
serve`` decodes (a thread pool of the HTTP process, so a bad image never reaches a batch) and the
batcher only batches tensors, as ours does; the front adds one local HTTP hop per request, ours one
pipe hop to its worker process. Replies: ``{"predictions": [...]}``; ``{"error": ...}`` with 400 for an
unreadable image or empty body, 413 over 20 MB, 500 if Triton fails. ``GET /health`` is 200 once
Triton has loaded the model (the model is warmed up before that). SIGTERM: the front stops taking
connections and answers what it holds, then Triton stops; exit code 0.

Environment (see ``setup_triton_env.sh``): PyTriton 0.7.0 needs numpy < 2 and runs Triton's python
backend stub linked against the system's ``libpython3.11.so`` (Debian 12: 3.11.2); the stub loads the
stdlib of the interpreter that started it, and pyenv's 3.11.7 stdlib calls
``_thread.RLock._recursion_count`` which 3.11.2's C module lacks (the ``'_thread.RLock' object has no
attribute '_recursion_count'`` failure). So this runs under a venv made from ``/usr/bin/python3.11``,
with the project venv's site-packages appended (torch, Pillow, ... : same cp311 ABI).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import numpy as np
import torch
import tritonclient.http.aio as triton_http
from aiohttp import web
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from xception.data.images import UnreadableImage, open_image
from xception.inference.classify import decode_predictions, load_model
from xception.serve.worker import batch_buckets, fastest_path, run_padded

MAX_BATCH = 16
QUEUE_DELAY_US = 10_000  # = xception serve --batch-timeout-ms 10
MAX_BODY = 20 << 20  # = xception serve --max-body-mb 20
MAX_PIXELS = 50_000_000  # = ServeConfig.max_pixels
MODEL = "xception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def main() -> int:
    weights, port = sys.argv[1], int(sys.argv[2])
    instances = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    threads = os.cpu_count() or 1  # as xception serve's one worker: every core
    torch.set_num_threads(threads)
    per_instance = max(1, threads // instances)

    model = load_model(weights, device="cpu", int8=False)
    fast, path = fastest_path(model, torch.device("cpu"), compile=False)
    buckets = batch_buckets(MAX_BATCH)
    if hasattr(fast.module, "MAX_FROZEN_SHAPES"):  # static int8: one traced graph per bucket, as our worker
        fast.module.MAX_FROZEN_SHAPES = len(buckets)
    size = model.preprocessing.image_size
    with torch.no_grad():
        for b in buckets:
            fast(torch.zeros(b, 3, size, size))
    transform = model.preprocessing.eval_transform()
    class_names = list(model.class_names)

    local = threading.local()

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        if not getattr(local, "threads_set", False):  # intra-op threads are set per calling thread
            torch.set_num_threads(per_instance)
            local.threads_set = True
        with torch.no_grad():
            probs = run_padded(fast, torch.from_numpy(image), buckets).float().softmax(dim=1)
        return {"probs": probs.numpy()}

    ports = [free_port() for _ in range(3)]
    triton = Triton(config=TritonConfig(http_address="127.0.0.1", http_port=ports[0], grpc_address="127.0.0.1",
                                        grpc_port=ports[1], metrics_address="127.0.0.1", metrics_port=ports[2],
                                        exit_timeout_secs=30, log_verbose=0))
    triton.bind(model_name=MODEL, infer_func=[infer] * instances,  # a list: one model instance each
                inputs=[Tensor(name="image", dtype=np.float32, shape=(3, size, size))],
                outputs=[Tensor(name="probs", dtype=np.float32, shape=(len(class_names),))],
                config=ModelConfig(max_batch_size=MAX_BATCH,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US)))
    triton.run()  # starts tritonserver and loads the model; returns once it is ready

    def preprocess(body: bytes) -> np.ndarray:
        return transform(open_image(body, "the uploaded image", max_pixels=MAX_PIXELS))[None].numpy()

    async def predict(request: web.Request) -> web.Response:
        try:
            topk = int(request.query.get("topk", "5"))
        except ValueError:
            return error(400, f"topk must be an integer, got {request.query.get('topk')!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"body over the limit of {MAX_BODY >> 20} MB")
        if not body:
            return error(400, "empty body: send the image's bytes")
        try:
            x = await asyncio.get_running_loop().run_in_executor(None, preprocess, body)
        except UnreadableImage as e:
            return error(400, str(e))
        inp = triton_http.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        try:
            result = await request.app["client"].infer(MODEL, [inp], outputs=[
                triton_http.InferRequestedOutput("probs", binary_data=True)])
        except Exception as e:  # noqa: BLE001 - Triton's error, named
            return error(500, f"triton: {type(e).__name__}: {e}")
        top = decode_predictions(result.as_numpy("probs"), topk, class_names)[0]
        return web.json_response({"predictions": [{"label": p.label, "prob": p.prob, "index": p.index} for p in top]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "path": path, "server": "triton"})

    async def client_ctx(app: web.Application):
        app["client"] = triton_http.InferenceServerClient(f"127.0.0.1:{ports[0]}", conn_limit=512,
                                                          conn_timeout=300.0)
        yield
        await app["client"].close()

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/predict", predict)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(client_ctx)
    try:
        print(f"triton peer: {model.model_name} ({path}) ready at http://127.0.0.1:{port}", flush=True)
        web.run_app(app, host="127.0.0.1", port=port, print=None, shutdown_timeout=30, access_log=None)
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
