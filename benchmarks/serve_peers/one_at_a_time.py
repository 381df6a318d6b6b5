"""The peer most teams start with: a hand-written FastAPI route that classifies one image per
request, one at a time (no batching), on the same model and fast path as ``xception serve``.

    python benchmarks/serve_peers/one_at_a_time.py WEIGHTS PORT
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.concurrency import run_in_threadpool  # noqa: E402

from xception.data.images import UnreadableImage, open_image  # noqa: E402
from xception.inference.classify import decode_predictions, load_model  # noqa: E402
from xception.serve.worker import fastest_path  # noqa: E402

weights, port = sys.argv[1], int(sys.argv[2])
model = load_model(weights, device="cpu", int8=False)
fast, path = fastest_path(model, torch.device("cpu"), compile=False)
transform = model.preprocessing.eval_transform()
lock = threading.Lock()  # one inference at a time
app = FastAPI()


@app.get("/health")
def health():
    return {"status": "ok", "path": path}


def classify(body: bytes, topk: int) -> dict:
    try:
        x = transform(open_image(body, "upload"))[None]  # decoding runs in parallel on FastAPI's threads
    except UnreadableImage as e:
        raise HTTPException(400, str(e)) from None
    with lock, torch.no_grad():  # the model: one image at a time
        probs = fast(x).float().softmax(dim=1)
    top = decode_predictions(probs, topk, model.class_names)[0]
    return {"predictions": [{"label": p.label, "prob": p.prob, "index": p.index} for p in top]}


@app.post("/predict")
async def predict(request: Request, topk: int = 5):
    return await run_in_threadpool(classify, await request.body(), topk)


if __name__ == "__main__":
    fast(torch.zeros(1, 3, model.preprocessing.image_size, model.preprocessing.image_size))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
