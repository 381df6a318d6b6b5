"""The one Preprocessing object: its transforms, and that it travels with the weights into every
command (training, evaluation, prediction, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import xception
from xception.weights import load_pretrained
from xception.cli import main
from xception.deploy.export import export_model
from xception.preprocessing import Preprocessing
from xception.training.checkpoint import load_checkpoint
from xception.weights.sources import KERAS_PREPROCESSING, TIMM_PREPROCESSING

SMALL = ["--model-kwargs", "middle_blocks=0", "--batch-size", "2", "--workers", "0", "--device", "cpu",
         "--epochs", "1", "--no-tensorboard"]


def test_defaults_validation_and_round_trip():
    p = Preprocessing()
    assert (p.image_size, p.crop_pct, p.interpolation, p.mean, p.std) == (299, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    q = Preprocessing(image_size=24, crop_pct=1.0, interpolation="bilinear", mean=[0.4, 0.5, 0.6], std=[0.2] * 3)
    assert Preprocessing.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert q.replace(image_size=None, crop_pct=0.5) == Preprocessing(24, 0.5, "bilinear", (0.4, 0.5, 0.6), (0.2,) * 3)
    for bad in ({"image_size": 0}, {"crop_pct": 0.0}, {"crop_pct": 1.5}, {"interpolation": "lanczos9"},
                {"mean": (0.5,), "std": (0.5, 0.5)}, {"std": (0.5, 0.0, 0.5)}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            Preprocessing(**bad)
    with pytest.raises(ValueError, match="unknown preprocessing option"):
        Preprocessing.from_dict({"size": 3})


def test_eval_transform_resizes_crops_and_normalises():
    img = Image.fromarray(np.full((40, 80, 3), 255, dtype=np.uint8))  # 80 wide, 40 high, white
    x = Preprocessing(image_size=20, crop_pct=0.5, mean=(0.25,) * 3, std=(0.5,) * 3).eval_transform()(img)
    assert x.shape == (3, 20, 20) and torch.allclose(x, torch.full_like(x, 1.5))  # (1 - 0.25) / 0.5
    gray = Image.fromarray(np.zeros((10, 10), dtype=np.uint8))
    assert Preprocessing(image_size=8).train_transform(hflip=False)(gray).shape == (3, 8, 8)


def _randomized(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return xception.create_model(name, **kwargs).eval()


def test_sources_and_our_files_carry_their_preprocessing(tmp_path):
    model = _randomized("xception", num_classes=3, middle_blocks=0)
    assert not hasattr(model, "preprocessing") or model.preprocessing == Preprocessing()
    torch.save(model.state_dict(), tmp_path / "timm_layout.pth")  # a foreign (timm/Cadene) file
    loaded = xception.create_model("xception", pretrained=tmp_path / "timm_layout.pth", middle_blocks=0)
    assert loaded.preprocessing == TIMM_PREPROCESSING["xception"] and loaded.preprocessing.crop_pct == 0.8975

    custom = Preprocessing(image_size=40, crop_pct=0.9, interpolation="bilinear", mean=(0.4,) * 3, std=(0.3,) * 3)
    xception.save_safetensors(model, tmp_path / "ours.safetensors", preprocessing=custom)
    again = xception.create_model(pretrained=tmp_path / "ours.safetensors")
    assert again.preprocessing == custom
    xception.save_safetensors(again, tmp_path / "copy.safetensors")  # the model's own is written back
    assert xception.create_model(pretrained=tmp_path / "copy.safetensors").preprocessing == custom
    assert KERAS_PREPROCESSING.crop_pct == 1.0 and KERAS_PREPROCESSING.mean == (0.5,) * 3


def test_aligned_timm_files_get_timm_settings(tmp_path):
    model = _randomized("xception41p", num_classes=2)
    torch.save(model.state_dict(), tmp_path / "x41p.pth")
    assert xception.create_model("xception41p", pretrained=tmp_path / "x41p.pth").preprocessing.crop_pct == 0.94


def test_training_takes_the_weights_preprocessing_and_records_it(tmp_path, tiny_folder):
    """Fine-tuning from a file trains and evaluates with its preprocessing (image size, mean/std), unless
    a flag overrides it; the checkpoint records the run's, and eval / predict / export read it."""
    start = _randomized("xception", num_classes=2, middle_blocks=0)
    pre = Preprocessing(image_size=20, crop_pct=1.0, interpolation="bilinear", mean=(0.45,) * 3, std=(0.25,) * 3)
    xception.save_safetensors(start, tmp_path / "start.safetensors", ["cat", "dog"], preprocessing=pre)

    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--pretrained",
                 str(tmp_path / "start.safetensors"), *SMALL]) == 0
    assert load_checkpoint(out / "last.pt")["preprocessing"] == pre.to_dict()
    model = load_pretrained(None, out / "last.pt")
    assert model.preprocessing == pre

    out2 = tmp_path / "run2"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out2), "--pretrained",
                 str(tmp_path / "start.safetensors"), "--image-size", "16", "--crop-pct", "0.8", *SMALL]) == 0
    assert load_checkpoint(out2 / "last.pt")["preprocessing"] == pre.replace(image_size=16, crop_pct=0.8).to_dict()

    report = export_model(model, "exported-program", tmp_path / "m.pt2", check=False)
    program = torch.export.load(report.path)
    assert tuple(program.example_inputs[0][0].shape[-2:]) == (20, 20)  # traced at the weights' image size


def test_scratch_training_uses_the_one_default(tmp_path, tiny_folder):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--image-size", "16", *SMALL]) == 0
    assert load_checkpoint(out / "last.pt")["preprocessing"] == Preprocessing(image_size=16).to_dict()
