"""Segmentation training: it resumes bit for bit after SIGTERM, and under torchrun each rank reads
its share of every epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xception.segmentation.synthetic import make_shapes
from xception.segmentation.train import SegmentTrainConfig, fit
from xception.training.engine import StepHooks
from xception.training.trainer import TrainingInterrupted

HOOKED = str(Path(__file__).resolve().parents[1] / "hooked_train.py")
SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = {"backbone": "xception", "encoder_options": {"middle_blocks": 0}, "device": "cpu", "workers": 0,
        "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=24, val=8, size=48, seed=0)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_sigterm_is_bitwise(shapes, tmp_path, one_thread):
    options = dict(data=str(shapes), epochs=2, batch_size=8, crop_size=32, **TINY)
    fit(SegmentTrainConfig(out=str(tmp_path / "straight"), **options))

    def stop_at_4(step: int) -> None:
        if step == 4:  # mid epoch 2 (3 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        fit(SegmentTrainConfig(out=str(tmp_path / "stopped"), **options), StepHooks(after_step=stop_at_4))
    saved = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["epoch_step"]) == (1, 4, 1)
    fit(SegmentTrainConfig(out=str(tmp_path / "stopped"), resume="", **options))
    straight, resumed = _state(tmp_path / "straight" / "last.pt"), _state(tmp_path / "stopped" / "last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "stopped")]
    assert [json.loads(m)["val_miou"] for m in metrics[0]] == [json.loads(m)["val_miou"] for m in metrics[1]]

    saved["model"].pop("classifier.bias")  # a checkpoint whose weights do not fit its model: named, in one line
    torch.save(saved, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt.*classifier\.bias") as err:
        fit(SegmentTrainConfig(out=str(tmp_path / "again"), resume=str(tmp_path / "broken.pt"), **options))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_torchrun_two_ranks_see_each_sample_once_per_epoch(shapes, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", HOOKED,
           "--samples", str(samples), "--", "segment", "train", "--data", str(shapes), "--out", str(tmp_path / "run"),
           "--backbone", "xception", "--encoder-options", "middle_blocks=0", "--epochs", "1", "--batch-size", "4",
           "--crop-size", "32", "--device", "cpu", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_epoch: dict[int, list[int]] = {0: []}
    for rank in (0, 1):
        for line in (samples / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            per_epoch[row["epoch"]] += row["indices"]
    assert all(sorted(seen) == list(range(24)) for seen in per_epoch.values()), per_epoch
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and not any(k.startswith("module.") for k in saved["model"])
    assert proc.stdout.count("done:") == 1
