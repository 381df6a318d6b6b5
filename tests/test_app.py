"""``xception app``: the Gradio page, started on localhost here and used through ``gradio_client``."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xception
from weight_files import randomize
from xception.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = randomize(xception.create_model("xception", num_classes=6, middle_blocks=0), seed=1)
    path = tmp_path_factory.mktemp("app") / "six.safetensors"
    return xception.save_safetensors(model, path, ["cat", "dog", "fox", "owl", "bee", "elk"],
                                     preprocessing=xception.Preprocessing(image_size=48))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_app_classifies_an_uploaded_photo(weights, tmp_path):
    """``xception app`` in its own process (as a user starts it): it prints its address; a photo sent
    through gradio_client comes back with the top-5 classes and the Grad-CAM overlay.

    Its own process also keeps uvicorn's logging set-up (which closes every live log handler) away
    from this test session's captured output."""
    from gradio_client import Client, handle_file

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((70, 50)).save(photo)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "xception", "app", "--weights", str(weights), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        seen = []
        while not any("xception app: serving" in line for line in seen):
            seen.append(lines.get(timeout=180))  # queue.Empty: it never said where it serves
        url = seen[-1].rsplit(" at ", 1)[1].split()[0]
        assert url.rstrip("/") == f"http://127.0.0.1:{port}"
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False)
        labels, overlay = client.predict(handle_file(str(photo)), api_name="/classify")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    expected = xception.Classifier(weights, device="cpu")(photo, topk=5)
    assert labels["label"] == expected[0].label
    assert [c["label"] for c in labels["confidences"]] == [p.label for p in expected]
    assert [c["confidence"] for c in labels["confidences"]] == pytest.approx([p.prob for p in expected], rel=1e-4)
    shown = Image.open(overlay)
    assert shown.size == (48, 48) and shown.format == "PNG"  # what the model saw, with the heatmap over it
    assert np.asarray(shown.convert("RGB")).std() > 0


def test_app_bad_input_and_missing_extra(weights, monkeypatch, capsys):
    assert main(["app", "--weights", "imagenet_v2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights not found: imagenet_v2" in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["app", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "xception[app]"' in err and len(err.splitlines()) == 1
