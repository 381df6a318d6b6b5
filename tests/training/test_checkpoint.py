"""Checkpoint contents: safe loading, format checks, the model and preprocessing they rebuild,
and the random state for exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import xception
from xception.weights import load_pretrained
from xception.preprocessing import Preprocessing
from xception.training.checkpoint import (capture_rng, cpu_state_dict, load_checkpoint,
                                          restore_rng, save_checkpoint)


def _checkpoint(model, **extra) -> dict:
    return {"format": "xception-checkpoint", "model_name": model.model_name,
            "config": model.config.to_dict(), "model": cpu_state_dict(model), **extra}


def test_load_checkpoint_is_safe_and_checks_format(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an xception training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")

    torch.save({"format": "xception-checkpoint", "obj": random.Random()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused: .*nothing from it was run"):
        load_checkpoint(tmp_path / "evil.pt")  # weights_only refuses arbitrary objects
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_capture_restore_roundtrip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = capture_rng()
    torch.save({"rng": state}, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_model_from_checkpoint_carries_classes_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=2, middle_blocks=0)
    pre = Preprocessing(image_size=24, crop_pct=1.0, interpolation="bilinear", mean=(0.4,) * 3, std=(0.2,) * 3)
    save_checkpoint(_checkpoint(model, class_names=["cat", "dog"], preprocessing=pre.to_dict()), tmp_path / "a.pt")
    rebuilt = load_pretrained(None, tmp_path / "a.pt")
    assert rebuilt.class_names == ["cat", "dog"] and rebuilt.preprocessing == pre
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


def test_checkpoint_without_preprocessing_uses_its_run_settings(tmp_path):
    """Checkpoints written before preprocessing was recorded: the run's image size and crop."""
    model = xception.create_model("xception", num_classes=2, middle_blocks=0)
    save_checkpoint(_checkpoint(model, train_config={"image_size": 32, "crop_pct": 1.0}), tmp_path / "old.pt")
    rebuilt = load_pretrained(None, tmp_path / "old.pt")
    assert rebuilt.preprocessing == Preprocessing(image_size=32, crop_pct=1.0)


def test_checkpoint_errors_name_the_file(tmp_path):
    model = xception.create_model("xception", num_classes=2, middle_blocks=0)
    ckpt = _checkpoint(model)
    del ckpt["model"]["fc.bias"]
    save_checkpoint(ckpt, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"cut\.pt: weights do not fit xception: .*classifier"):
        load_pretrained(None, tmp_path / "cut.pt")
    save_checkpoint({**_checkpoint(model), "preprocessing": {"image_size": -3}}, tmp_path / "pre.pt")
    with pytest.raises(ValueError, match=r"pre\.pt: corrupt preprocessing record"):
        load_pretrained(None, tmp_path / "pre.pt")
    save_checkpoint({"format": "xception-checkpoint", "model_name": "xception", "config": {}}, tmp_path / "nomodel.pt")
    with pytest.raises(ValueError, match=r"nomodel\.pt: xception checkpoint without 'model'"):
        load_checkpoint(tmp_path / "nomodel.pt")
