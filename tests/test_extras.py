"""Optional features without their extra: one line naming the exact ``pip install "xception[...]"``."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import xception
from xception.cli import main
from xception.extras import MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_extra(monkeypatch):
    _hide(monkeypatch, "onnxscript")
    with pytest.raises(MissingExtra, match=r'^ONNX export needs onnxscript: pip install "xception\[onnx\]"$'):
        require("onnxscript", "onnx", "ONNX export")
    assert require("json", "onnx", "x").__name__ == "json"


def test_extras_in_pyproject_cover_what_the_code_asks_for():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    packages = {name: {r.split(">")[0].split("=")[0].split("[")[0] for r in reqs} for name, reqs in extras.items()}
    assert {"onnx", "onnxscript", "onnxruntime"} <= packages["onnx"]
    assert {"timm", "onnxruntime"} <= packages["bench"]
    assert "tensorboard" in packages["tensorboard"]
    assert "xception[onnx,bench,tensorboard]" in extras["test"]  # the tests import every optional feature


def test_cli_export_onnx_without_the_extra(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "onnxscript")
    model = xception.create_model("xception", num_classes=2, middle_blocks=0)
    xception.save_safetensors(model, tmp_path / "m.safetensors")
    rc = main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "onnx", "--image-size", "32",
               str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and 'pip install "xception[onnx]"' in err
    assert not (tmp_path / "m.onnx").exists()


def test_train_tensorboard_asked_for_but_missing(monkeypatch, tmp_path, tiny_folder, capsys):
    _hide(monkeypatch, "tensorboard")
    args = ["train", "--data", str(tiny_folder), "--model-kwargs", "middle_blocks=0", "--image-size", "16",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    rc = main([*args, "--out", str(tmp_path / "a"), "--tensorboard"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and 'pip install "xception[tensorboard]"' in err
    assert not (tmp_path / "a" / "last.pt").exists()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # not asked for: trains without the events
    assert (tmp_path / "b" / "last.pt").exists() and not (tmp_path / "b" / "tensorboard").exists()


def test_bench_peer_without_the_extra_is_a_row(monkeypatch):
    from xception.bench.harness import run_bench

    _hide(monkeypatch, "timm")
    report = run_bench(model_name="xception", image_size=32, dtypes=["fp32"], modes=["eager"], compare=["timm"],
                       warmup=0, repeats=1, min_round_s=0.0, model_kwargs={"middle_blocks": 0, "num_classes": 2})
    rows = [r for r in report["results"] if r["impl"] == "timm"]
    assert len(rows) == 1 and 'pip install "xception[bench]"' in rows[0]["error"]
    assert any(r["impl"] == "ours" and r["images_per_s"] for r in report["results"])
