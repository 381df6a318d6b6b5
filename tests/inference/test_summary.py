"""``xception summary``: the layer table, like Keras's ``model.summary()``."""

from __future__ import annotations

import sys

import xception
from xception.cli import main


def test_summary_of_the_default_model_and_of_a_weights_file(tmp_path, capsys):
    assert main(["summary", "--image-size", "71"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("xception at 71x71")
    assert "Total params: 22,855,952" in out  # the paper's count
    assert "(block12)" in out and "(pointwise)" in out  # nested modules, 4 levels deep by default
    assert "[1, 2048, 3, 3]" in out and "[1, 1000]" in out  # output shapes at 71 px

    small = xception.create_model("xception", num_classes=3, middle_blocks=0)
    path = xception.save_safetensors(small, tmp_path / "s.safetensors",
                                     preprocessing=xception.Preprocessing(image_size=40))
    assert main(["summary", "--weights", str(path), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("xception at 40x40") and "(block1)" in out and "(rep)" not in out
    assert f"Total params: {sum(p.numel() for p in small.parameters()):,}" in out and "[1, 3]" in out


def test_summary_bad_input(monkeypatch, capsys):
    assert main(["summary", "--model", "resnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resnet50" in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torchinfo", None)
    assert main(["summary"]) == 2
    assert 'pip install "xception[summary]"' in capsys.readouterr().err
