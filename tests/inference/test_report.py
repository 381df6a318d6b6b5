"""``xception eval --report DIR``: confusion matrix, per-class precision / recall / F1 (CSV and
Markdown), and the gallery of the most confident mistakes with their Grad-CAM maps."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from weight_files import randomize

import xception
from xception.cli import main
from xception.inference.report import MistakeWatch, per_class_metrics


def test_per_class_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))  # class 4 is never predicted
    y_true[y_true == 3] = 2  # class 3 never occurs
    confusion = np.zeros((5, 5), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    rows = per_class_metrics(confusion.tolist(), list("abcde"))
    from sklearn.metrics import (
        precision_recall_fscore_support,  # 2.5 s to import: here, not at collection
    )

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    assert [row["class"] for row in rows] == list("abcde")
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)
    assert [row["support"] for row in rows] == s.tolist()


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.calls * len(x):(self.calls + 1) * len(x)]
        self.calls += 1
        return out


def test_mistake_watch_keeps_the_most_confident_mistakes_and_changes_nothing():
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    targets = torch.tensor([1, 1, 0, 1, 0, 0])  # wrong: 0 (p 0.98), 2 (0.95), 3 (0.88), 4 (0.99)
    watch = MistakeWatch(FixedLogits(logits), keep=3)
    batches = [(torch.full((2, 3, 4, 4), float(i)), targets[2 * i:2 * i + 2], None, 0) for i in range(3)]
    outputs = []
    for images, target, _, _ in watch.batches(batches):
        outputs.append(watch(images))
    assert torch.equal(torch.cat(outputs), logits)
    kept = watch.mistakes()
    assert [(t, p) for _, _, t, p in kept] == [(0, 1), (1, 0), (0, 1)]  # images 4, 0, 2
    assert [c for c, _, _, _ in kept] == pytest.approx(torch.tensor([5.0, 4.0, 3.0]).sigmoid().tolist())
    assert [x[0, 0, 0].item() for _, x, _, _ in kept] == [2.0, 0.0, 1.0]  # the images of the batches they were in


@pytest.fixture(scope="module")
def two_class_weights(tmp_path_factory):
    model = randomize(xception.create_model("xception", num_classes=2, middle_blocks=0), seed=3)
    path = tmp_path_factory.mktemp("w") / "catdog.safetensors"
    return xception.save_safetensors(model, path, ["cat", "dog"], preprocessing=xception.Preprocessing(image_size=32))


def test_eval_report_files(two_class_weights, tiny_folder, tmp_path, capsys):
    args = ["eval", "--weights", str(two_class_weights), "--data", str(tiny_folder), "--workers", "0",
            "--device", "cpu", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    out = tmp_path / "report"
    assert main([*args, "--report", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["top1"], r["loss"], r["confusion"]) == (plain["top1"], plain["loss"], plain["confusion"])  # same pass
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "mistakes.png", "per_class.csv",
                                                     "per_class.md"]
    assert r["report"]["markdown"] == str(out / "per_class.md")

    c = r["confusion"]  # rows: true cat, dog
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == ["cat", "dog"] and [int(row["support"]) for row in rows] == [2, 2]
    for k, row in enumerate(rows):
        predicted = c[0][k] + c[1][k]
        assert float(row["recall"]) == pytest.approx(c[k][k] / 2, abs=1e-4)
        assert float(row["precision"]) == pytest.approx(c[k][k] / predicted if predicted else 0.0, abs=1e-4)
    md = (out / "per_class.md").read_text()
    assert f"Top-1 **{100 * r['top1']:.1f}%**" in md and "| cat |" in md and "| dog |" in md
    assert "![confusion matrix](confusion_matrix.png)" in md and "(mistakes.png)" in md

    wrong = 4 - c[0][0] - c[1][1]
    assert wrong > 0  # random weights: some mistakes to show
    assert f"The {wrong} most confident mistakes, each with the Grad-CAM map (at `features`)" in md
    per_row = min(4, wrong)  # each mistake: the image and its Grad-CAM overlay, 220 x 270 px at 100 dpi
    assert Image.open(out / "mistakes.png").size == (2 * 220 * per_row, 270 * math.ceil(wrong / 4))
    assert Image.open(out / "confusion_matrix.png").size[0] > 100

    assert main([*args, "--report", str(tmp_path / "r2"), "--layer", "block2"]) == 0
    assert "Grad-CAM map (at `block2`)" in (tmp_path / "r2" / "per_class.md").read_text()
    capsys.readouterr()
    for layer, message in (("block9", "layer 'block9' is not a submodule"), ("relu", "runs 4 times")):
        assert main([*args, "--report", str(tmp_path / "r3"), "--layer", layer]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "r3").exists() or not list((tmp_path / "r3").iterdir())  # no partial report
