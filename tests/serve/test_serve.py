"""``xception serve``: the service in-process (every status it answers, agreement with ``xception
predict``, metrics) and as a subprocess on a free port (worker killed under load, SIGTERM under load)."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xception
from xception.inference.predict import predict
from xception.serve import ServeConfig, Service

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=4, middle_blocks=0).eval()
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    xception.save_safetensors(model, path, ["cat", "dog", "fox", "owl"],
                              preprocessing=xception.Preprocessing(image_size=32, crop_pct=1.0))
    return path


def _image_bytes(fmt: str = "PNG", size=(40, 30), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A small PNG whose header claims side x side pixels (a decompression bomb's shape)."""
    raw = _image_bytes("PNG", size=(8, 8), mode="L")
    ihdr = raw[8:33]  # length, "IHDR", 13 bytes of data, CRC
    data = struct.pack(">II", side, side) + ihdr[16:21]
    chunk = struct.pack(">I", 13) + b"IHDR" + data + struct.pack(">I", zlib.crc32(b"IHDR" + data))
    return raw[:8] + chunk + raw[33:]


def _broken_crc_png() -> bytes:
    raw = bytearray(_image_bytes("PNG"))
    raw[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(raw)


def _odd_but_valid() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray((np.arange(16 * 8).reshape(8, 16) * 500).astype(np.uint16)).save(buf, format="PNG")
    return {"1x1": _image_bytes("PNG", size=(1, 1)), "gif": _image_bytes("GIF", mode="P"),
            "16-bit png": buf.getvalue(), "cmyk jpeg": _image_bytes("JPEG", mode="CMYK"),
            "exif-rotated jpeg": _image_bytes("JPEG", size=(48, 64), exif=exif)}


def _wait_healthy(get, timeout: float = 180.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = get("/health")
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 503 and "error" in r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not become healthy")


KEY = "s3cret"


@pytest.fixture(scope="module")
def client(weights):
    """One service for the in-process tests (a worker takes seconds to start), with an API key that
    the client sends on every request unless a test takes it off."""
    service = Service(ServeConfig(weights=str(weights), workers=1, max_batch_size=4, batch_timeout_ms=5, threads=1,
                                  max_body_mb=1, api_key=KEY))
    with TestClient(service.app) as c:
        c.headers["X-API-Key"] = KEY
        _wait_healthy(c.get)
        yield c


def test_predictions_agree_with_xception_predict(client, weights, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"p{i}.png")
        files[-1].write_bytes(_image_bytes(seed=i))
    expected = list(predict(weights, [str(f) for f in files], topk=4, device="cpu", workers=0))
    for f, row in zip(files, expected):
        r = client.post("/predict?topk=4", content=f.read_bytes())
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [t["class"] for t in row["top"]]
        assert [p["index"] for p in got] == [["cat", "dog", "fox", "owl"].index(t["class"]) for t in row["top"]]
        np.testing.assert_allclose([p["prob"] for p in got], [t["prob"] for t in row["top"]], rtol=1e-4, atol=1e-6)
    r = client.post("/predict", files={"file": ("p0.png", files[0].read_bytes(), "image/png")})  # multipart
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == \
        [t["class"] for t in expected[0]["top"]]
    assert len(client.post("/predict?topk=2", content=files[0].read_bytes()).json()["predictions"]) == 2


def test_broken_input_gets_its_4xx_and_a_message(client):
    cases = {
        "empty": (b"", 400, "empty body"),
        "text": (b"hello, not an image", 400, "not a readable image"),
        "truncated jpeg": (_image_bytes("JPEG")[:300], 400, "not a readable image"),
        "png with a broken crc": (_broken_crc_png(), 400, "not a readable image"),
        "decompression bomb": (_bomb_png(), 400, "refused"),
        "a bomb under Pillow's limit": (_bomb_png(9000), 400, "9000x9000 pixels is over the limit"),
        "body over the limit": (b"\0" * (2 << 20), 413, "over the limit of 1 MB"),
    }
    for name, (body, status, text) in cases.items():
        r = client.post("/predict", content=body)
        assert r.status_code == status and text in r.json()["error"], (name, r.status_code, r.text)
    r = client.post("/predict", files={"other": ("a.png", _image_bytes(), "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    assert client.post("/predict?topk=abc", content=_image_bytes()).status_code == 400
    assert client.post("/predict?topk=0", content=_image_bytes()).status_code == 400
    r = client.get("/nowhere")
    assert r.status_code == 404 and "GET /nowhere" in r.json()["error"]
    assert client.get("/predict").status_code == 405
    assert client.get("/health").status_code == 200  # healthy after all of them


def test_odd_but_valid_images_are_answered(client):
    for name, body in _odd_but_valid().items():
        r = client.post("/predict", content=body)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 4, (name, r.text)


def test_metrics_count_statuses_latency_and_batches(client):
    client.post("/predict", content=b"")
    client.post("/predict", content=_image_bytes())
    text = client.get("/metrics").text
    assert 'xception_requests_total{route="predict",status="400"}' in text
    assert 'xception_requests_total{route="predict",status="200"}' in text
    assert "xception_request_seconds_bucket" in text and "xception_batch_size_count" in text
    assert "xception_queue_depth" in text


def test_api_key(client):
    body = _image_bytes()
    del client.headers["X-API-Key"]
    try:
        r = client.post("/predict", content=body)
        assert r.status_code == 401 and r.json()["error"].startswith("missing API key")
        r = client.post("/predict", content=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"] == "wrong API key"
        r = client.post("/predict", content=body, headers={"X-API-Key": "nope", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 401  # X-API-Key, when given, is the one checked
        assert client.post("/predict", content=body, headers={"X-API-Key": KEY}).status_code == 200
        assert client.post("/predict", content=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/health").status_code == 200  # health and metrics stay open for probes
    finally:
        client.headers["X-API-Key"] = KEY


# --- as a process -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(weights: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "xception", "serve", "--weights", str(weights), "--port", str(port),
                             "--device", "cpu", "--threads", "1", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_worker_killed_under_load_is_replaced_and_nothing_hangs(weights):
    proc, url = _start(weights, "--max-batch-size", "4")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            pid = _wait_healthy(c.get)["worker_pids"][0]
            body = _image_bytes()

            def call(_):
                try:
                    status = c.post("/predict", content=body).status_code
                except httpx.TimeoutException:
                    status = "hang"
                return status, time.monotonic()

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(call, i) for i in range(64)]
                time.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                results = [f.result() for f in futures]
            statuses = [status for status, _ in results]
            assert "hang" not in statuses and set(statuses) <= {200, 503}, statuses
            deadline = time.monotonic() + 120
            while (health := _wait_healthy(c.get, timeout=120))["worker_pids"][0] == pid:
                assert time.monotonic() < deadline, "the dead worker was not replaced"
                time.sleep(0.2)
            back = time.monotonic()
            # Nothing waited for the new worker (it loads for seconds): the requests queued when the
            # worker died were answered 503 at once, not after the restart.
            assert max(done for _, done in results) - killed < (back - killed) / 2
            assert c.post("/predict", content=body).status_code == 200
    finally:
        _stop(proc)


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(weights):
    proc, url = _start(weights, "--max-batch-size", "4", "--max-queue", "1000")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            _wait_healthy(c.get)
            body = _image_bytes()
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(c.post, "/predict", content=body) for _ in range(8)]
                time.sleep(0.2)  # the requests are in
                proc.send_signal(signal.SIGTERM)
                statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * 8
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "ready at " + url in out
    finally:
        _stop(proc)


def test_serve_bad_weights_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "xception", "serve", "--weights", str(tmp_path / "none.safetensors"),
                        "--port", str(_free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "none.safetensors" in r.stderr


def test_batches_are_padded_to_a_few_shapes():
    from xception.serve.worker import batch_buckets, run_padded

    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1]
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)

    x = torch.randn(5, 3, 2, 2)
    out = run_padded(model, x, batch_buckets(16))
    assert seen == [8] and out.shape == (5, 1) and torch.equal(out, x.flatten(1).sum(1, keepdim=True))


def test_streams_split_a_batch_across_threads_of_one_intra_op_thread_each():
    import threading
    import time

    from xception.serve.worker import StreamRunner, batch_buckets

    calls = []

    def model(x):
        calls.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(), x.shape[0]))
        time.sleep(0.02)  # long enough that every stream takes parts
        return x.flatten(1).sum(1, keepdim=True)

    x = torch.randn(7, 3, 2, 2)
    runner = StreamRunner(model, batch_buckets(16), streams=2, threads=2)
    try:
        assert torch.equal(runner(x), x.flatten(1).sum(1, keepdim=True))  # the parts in order
        assert sorted(c[3] for c in calls) == [1] * 7  # parts of one image
        assert len({c[0] for c in calls}) == 2 and threading.get_ident() not in {c[0] for c in calls}
        assert all(c[1] == 1 and not c[2] for c in calls)  # one intra-op thread each, no autograd
        calls.clear()
        runner(x[:1])  # a lone image: whole, on the caller's thread and threads
        assert calls == [(threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(), 1)]
        assert runner.batch_sizes == [1]
    finally:
        runner.close()
    runner = StreamRunner(model, batch_buckets(16))  # one stream: whole batches, padded to a bucket
    calls.clear()
    assert torch.equal(runner(x), x.flatten(1).sum(1, keepdim=True))
    assert [c[3] for c in calls] == [8] and runner.batch_sizes == [1, 2, 4, 8, 16]  # what the worker warms up
    with pytest.raises(ValueError, match="streams"):
        StreamRunner(model, [1], streams=0)
