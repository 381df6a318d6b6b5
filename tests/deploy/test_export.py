"""export_model: ONNX (checked with ONNX Runtime), TorchScript, exported program; dynamic batch."""

from __future__ import annotations

import pytest
import torch

import xception
from xception.deploy import export as export_mod
from xception.deploy.export import export_model
from xception.bench.harness import randomize_batchnorm_
from xception.deploy.parity import relative_error


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = xception.create_model("xception", middle_blocks=0, num_classes=7)
    return randomize_batchnorm_(m, generator=torch.Generator().manual_seed(3)).eval()


def test_onnx_parity_and_dynamic_batch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    report = export_model(model, "onnx", out, image_size=48)
    assert out.is_file() and set(report.errors) == {1, 3} and max(report.errors.values()) <= 1e-4
    # run the file ourselves at a batch size the export never saw
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 48, 48)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert got.shape == (5, 7) and relative_error(got, ref) <= 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats(model, tmp_path, fmt):
    out = tmp_path / f"m.{fmt}"
    report = export_model(model, fmt, out, image_size=40)
    assert out.is_file() and max(report.errors.values()) <= 1e-4
    x = torch.randn(2, 3, 40, 40)
    loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    with torch.no_grad():
        assert relative_error(loaded(x), model(x)) <= 1e-4


def test_failed_check_writes_nothing(model, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(export_mod, "EXPORT_TOLERANCE", -1.0)  # every error is now too large
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_model(model, "torchscript", out, image_size=40)
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_model(model, "tflite", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(model, "onnx", tmp_path / "missing" / "m.onnx")


def test_cli_export_bad_output_is_one_line(tmp_path, capsys):
    from xception.cli import main

    assert main(["export", "--format", "onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xception export: error:") and "does not exist" in err and "\n" not in err


def test_cli_export_from_safetensors_rebuilds_the_model(model, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from xception.cli import main

    weights = tmp_path / "m.safetensors"
    xception.save_safetensors(model, weights, class_names=[f"c{i}" for i in range(7)])
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(weights), "--format", "onnx", "--image-size", "48", str(out)]) == 0
    assert "relative error vs PyTorch fp32" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 48, 48)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert relative_error(got, model(x)) <= 1e-4  # the checkpoint's weights and middle_blocks=0


def test_cli_export_rejects_a_checkpoint_of_another_model(model, tmp_path, capsys):
    from xception.cli import main

    bad = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.randn(3, 3)}, bad)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(bad), "--format", "onnx", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "\n" not in err and not out.exists()
