"""The README's main job on data that ships with scikit-learn: train the seed's full Xception on
the handwritten digits, evaluate it on the held-out 20%, classify a few held-out digits from PNG
files, draw their Grad-CAM overlays, and write a summary
(``summary.md`` / ``summary.json``) saying where everything is.

Settings (measured on a 2-core CPU; see the README): 8x8 digits upsampled to 32x32 RGB, the
``finetune`` recipe (AdamW, warm-up + cosine) from random initialisation at lr 2e-3, batch 32,
a mild random-resized crop (area 0.7-1, no flip: digits are not mirror-symmetric), no centre-crop
margin at evaluation (the digits fill their 8x8 frame), EMA weights for evaluation. Grad-CAM is
taken at ``block2`` (a 4x4 map): at 32 px the last feature map is 1x1 and would show nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from .fileio import atomic_write
from .inference.classify import Classifier
from .inference.evaluate import evaluate_checkpoint
from .inference.predict import predict
from .training.checkpoint import load_checkpoint
from .data.datasets import DigitsDataset
from .training.recipes import TrainConfig
from .training.trainer import fit

log = logging.getLogger(__name__)

DEMO_SETTINGS: dict[str, Any] = dict(
    data="digits", model="xception", recipe="finetune", epochs=5, batch_size=32, image_size=32, lr=2e-3,
    train_scale=0.7, hflip=False, crop_pct=1.0, warmup_epochs=0.5, drop_rate=0.1, ema_decay=0.99,
    label_smoothing=0.1, workers=0, seed=0,
)
CAM_LAYER = "block2"  # (B, 256, 4, 4) at 32 px; the last feature map is 1x1 there


def save_samples(folder: Path, count: int = 8) -> list[tuple[Path, str]]:
    """Write ``count`` held-out digits as 32x32 PNGs; return (path, true label) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    val = DigitsDataset("val")
    picks = [round(i * (len(val) - 1) / max(count - 1, 1)) for i in range(count)]
    out = []
    for i in picks:
        img, label = val[i]
        path = folder / f"val{i:03d}_label{label}.png"
        img.resize((32, 32), Image.NEAREST).save(path)
        out.append((path, str(label)))
    return out


def save_overlays(ckpt: Path, samples: list[tuple[Path, str]], folder: Path, device: str) -> list[str]:
    """One Grad-CAM PNG per sample (the digit, the heatmap and the overlay of the predicted class)."""
    clf = Classifier(ckpt, device=device)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path, label in samples:
        explanation = clf.explain(path, topk=1, methods=["gradcam"], layer=CAM_LAYER)
        title = f"{path.name}: true {label}, Grad-CAM at {CAM_LAYER}"
        paths.append(str(explanation.save(folder / f"{path.stem}_gradcam.png", title=title)))
    return paths


def run_demo(out: str | Path = "demo_out", *, device: str = "auto", **overrides: Any) -> dict[str, Any]:
    """Train, evaluate, predict; write ``summary.md`` and ``summary.json`` in ``out``."""
    out = Path(out)
    start = time.perf_counter()
    settings = {**DEMO_SETTINGS, **overrides}
    train = fit(TrainConfig(out=str(out / "run"), device=device, **settings))
    trained = time.perf_counter()
    ckpt = Path(train["last_pt"])
    metrics = evaluate_checkpoint(ckpt, "digits", device=device, workers=0)
    samples = save_samples(out / "samples")
    predictions = []
    for (path, label), row in zip(samples, predict(ckpt, [str(p) for p, _ in samples], topk=3,
                                                    device=device, workers=0)):
        best = row["top"][0]
        predictions.append({"path": str(path), "label": label, "predicted": best["class"], "prob": best["prob"]})
    overlays = save_overlays(ckpt, samples, out / "samples" / "gradcam", device)
    for p, overlay in zip(predictions, overlays):
        p["gradcam"] = overlay
    wall = time.perf_counter() - start
    summary = {
        "task": "scikit-learn digits, 10 classes, stratified 80/20 split (1437 train / 360 held-out)",
        "model": _describe(ckpt),
        "settings": settings,
        "heldout_top1": metrics["top1"], "heldout_top5": metrics["top5"], "heldout_loss": metrics["loss"],
        "heldout_images": metrics["count"],
        "per_class_top1": metrics["per_class"],
        "predictions": predictions,
        "train_seconds": trained - start, "wall_seconds": wall,
        "files": {"run_dir": str(out / "run"), "last_checkpoint": str(ckpt), "best_checkpoint": train["best_pt"],
                  "metrics": str(out / "run" / "metrics.jsonl"), "curves": str(out / "run" / "curves.png"),
                  "samples": str(out / "samples"), "summary": str(out / "summary.md"),
                  "gradcam": str(out / "samples" / "gradcam")},
    }
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2) + "\n"), mode="w")
    atomic_write(out / "summary.md", lambda f: f.write(summary_markdown(summary)), mode="w")
    return summary


def _describe(ckpt: Path) -> str:
    c = load_checkpoint(ckpt)
    n = sum(v.numel() for k, v in c["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return (f"{c['model_name']} (the seed's architecture, {c['config']['middle_blocks']} middle blocks, "
            f"{n / 1e6:.1f}M parameters at {c['config']['num_classes']} classes)")


def summary_markdown(s: dict[str, Any]) -> str:
    lines = [
        "# xception demo",
        "",
        f"- Task: {s['task']}",
        f"- Model: {s['model']}",
        f"- Held-out top-1: **{100 * s['heldout_top1']:.2f}%** (top-5 {100 * s['heldout_top5']:.2f}%, "
        f"loss {s['heldout_loss']:.4f}, {s['heldout_images']} images)",
        f"- Time: {s['train_seconds']:.0f} s training, {s['wall_seconds']:.0f} s in all",
        "",
        "| image | true | predicted | probability | Grad-CAM |",
        "|---|---|---|---|---|",
    ]
    here = Path(s["files"]["summary"]).parent
    lines += [f"| {Path(p['path']).name} | {p['label']} | {p['predicted']} | {p['prob']:.3f} | "
              + f"[overlay]({os.path.relpath(p['gradcam'], here)}) |"
              for p in s["predictions"]]
    lines += ["", "Files:", ""] + [f"- {k}: `{v}`" for k, v in s["files"].items() if v is not None]
    lines += ["", "Next: `xception eval --checkpoint " + s["files"]["last_checkpoint"] + " --data digits`, "
              "`xception predict --checkpoint " + s["files"]["last_checkpoint"] + " " + s["files"]["samples"] + "`", ""]
    return "\n".join(lines)
