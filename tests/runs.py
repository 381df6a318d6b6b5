"""What the training tests share: the small run's flags and the check that two runs ended alike."""

from __future__ import annotations

from pathlib import Path

import torch

from xception.training.checkpoint import load_checkpoint

SMALL = ["--model-kwargs", "middle_blocks=0", "--image-size", "16", "--batch-size", "2", "--workers", "0",
         "--device", "cpu", "--seed", "7"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(ckpt_a: Path, ckpt_b: Path) -> None:
    a, b = load_checkpoint(ckpt_a), load_checkpoint(ckpt_b)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(sa, sb)
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
