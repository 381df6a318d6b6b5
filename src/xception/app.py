"""``xception app``: a web page to classify and explain photos (Gradio, ``pip install "xception[app]"``).

Upload, paste or drop a photo: the page shows the top-5 classes with their probabilities and the
Grad-CAM overlay of the best one. It serves on localhost (``host``/``port`` to change that);
the same function is an API endpoint, ``/classify``, for ``gradio_client``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .extras import require
from .inference.classify import Classifier
from .plotting import overlay

API_NAME = "classify"


def gradio():
    return require("gradio", "app", "xception app")


def classify_and_explain(clf: Classifier, image: Any, topk: int = 5) -> tuple[dict[str, float], np.ndarray]:
    """``({label: probability} of the top ``topk``, the Grad-CAM overlay of the best class as uint8 RGB)``."""
    if image is None:
        raise gradio().Error("Upload a photo first.")
    labels = {t.label: t.prob for t in clf(image, topk=topk)}
    explanation = clf.explain(image, topk=1, methods=("gradcam",))
    shown = overlay(explanation.image, explanation.heatmaps["gradcam"][0])
    return labels, (255 * shown).round().astype(np.uint8)


def build_app(clf: Classifier, *, topk: int = 5, title: str | None = None):
    """The Gradio interface around ``clf``."""
    gr = gradio()

    def run(image):
        return classify_and_explain(clf, image, topk)

    return gr.Interface(
        fn=run,
        inputs=gr.Image(type="pil", label="photo", sources=["upload", "clipboard"]),
        outputs=[gr.Label(num_top_classes=topk, label=f"top-{topk} classes"),
                 gr.Image(type="numpy", format="png", label="Grad-CAM (best class), on what the model saw")],
        title=title or "Xception: classify and explain a photo",
        description=f"{clf.model.model_name}, {len(clf.class_names)} classes, "
                    f"{clf.preprocessing.image_size}x{clf.preprocessing.image_size} input. "
                    "Upload or drop a photo.",
        flagging_mode="never",
        api_name=API_NAME,
    )


def launch(weights: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
           topk: int = 5, block: bool = True):
    """Load ``weights``, serve the app on ``host:port`` and print its address; return ``(app, url)``.

    ``block=False`` returns at once with the server running in the background (tests).
    """
    gr = gradio()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing phones home
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    clf = Classifier(weights, device=device)
    app = build_app(clf, topk=topk)
    # System fonts: the page needs nothing from the internet.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           share=False, theme=theme, footer_links=["api"])
    print(f"xception app: serving {weights} at {url} (Ctrl-C to stop)", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url
