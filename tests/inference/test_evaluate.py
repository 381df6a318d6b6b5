"""The evaluation pass on a stand-in model: top-1, top-5, per-class accuracy, confusion, loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xception.data.images import Batch, Unreadable
from xception.inference.evaluate import evaluate


def test_evaluate_counts_top1_top5_per_class_and_confusion():
    class Fixed(nn.Module):  # predicts class 0 first, class 1 second
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]).repeat(len(x), 1)

    targets = torch.tensor([0, 0, 1, 2])
    loader = [Batch(torch.zeros(4, 3, 8, 8), targets, torch.arange(4), [(7, Unreadable("x.png", "truncated"))])]
    r = evaluate(Fixed(), loader, num_classes=6, device=torch.device("cpu"))
    assert r["top1"] == 0.5 and r["top5"] == 1.0 and r["count"] == 4 and r["skipped"] == 1
    assert r["per_class"][:3] == [1.0, 0.0, 0.0] and r["per_class"][3] is None
    assert r["confusion"][1][0] == 1 and r["confusion"][0][0] == 2
    expected = nn.functional.cross_entropy(Fixed()(torch.zeros(4, 1)), targets).item()
    assert r["loss"] == pytest.approx(expected)
