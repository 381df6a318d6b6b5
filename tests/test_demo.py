"""The demo's plumbing on a cut-down model (the real demo takes minutes: see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xception.demo import DEMO_SETTINGS, run_demo


@pytest.mark.slow
def test_demo_trains_evaluates_predicts_and_summarises(tmp_path):
    summary = run_demo(tmp_path, device="cpu", epochs=1, image_size=8, batch_size=128,
                       model_kwargs={"middle_blocks": 0})
    assert DEMO_SETTINGS["model"] == "xception" and "model_kwargs" not in DEMO_SETTINGS  # the real demo: full model
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["heldout_images"] == 360 and 0.0 <= saved["heldout_top1"] <= 1.0
    assert "0 middle blocks" in saved["model"]
    assert len(saved["predictions"]) == 8
    for p in saved["predictions"]:
        assert p["label"] in p["path"] and p["predicted"] in [str(i) for i in range(10)]
    for key in ("last_checkpoint", "metrics", "curves", "summary", "samples"):
        assert Path(saved["files"][key]).exists(), key
    md = (tmp_path / "summary.md").read_text()
    assert "Held-out top-1" in md and f"{100 * summary['heldout_top1']:.2f}%" in md
    overlays = sorted((tmp_path / "samples" / "gradcam").iterdir())  # a Grad-CAM PNG per sample, linked
    assert [p.name for p in overlays] == sorted(Path(p["path"]).stem + "_gradcam.png" for p in saved["predictions"])
    for p in saved["predictions"]:
        assert f"[overlay](samples/gradcam/{Path(p['path']).stem}_gradcam.png)" in md
        assert Path(p["gradcam"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
