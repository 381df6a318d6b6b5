"""Static int8 (every conv in int8, activation ranges calibrated on images): parity through whole
models, the calibration stored and rebuilt exactly, `xception quantize` and the commands that
read its file (predict, eval, bench, export), and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import xception
from xception.cli import main
from xception.bench.harness import randomize_batchnorm_
from xception.inference.classify import load_model
from xception.deploy.optimize import optimize
from xception.deploy.parity import TOLERANCE, relative_error
from xception.deploy.cpu import cpu_has_int8_dot, cpu_has_native_bf16
from xception.deploy.int8.prepare import STATIC_ENGINE, quantized_engine
from xception.deploy.int8.static import StaticInt8, calibrate_static, int8_model, save_int8
from xception.weights import read_weights, save_safetensors

INT8 = TOLERANCE["int8"]


def _model(**kwargs) -> nn.Module:
    """The seed model with 2 of its 8 middle blocks (the int8 path treats every block alike)."""
    torch.manual_seed(0)
    return randomize_batchnorm_(xception.create_model("xception", **{"middle_blocks": 2, **kwargs})).eval()


def _batches(n: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


@pytest.mark.parametrize("size", [32, 45])
def test_static_int8_matches_fp32_and_quantizes_every_conv(size, one_thread):
    model = _model(num_classes=10)
    q = calibrate_static(model, _batches(3, size))
    x = _batches(1, size, seed=7)[0]
    with torch.no_grad():
        ref = model(x)
    err = relative_error(q(x), ref)
    assert 0 < err <= INT8, err
    modules = list(q._quantized.modules())
    assert not [m for m in modules if isinstance(m, nn.Conv2d)]  # no conv left in floating point
    int8_convs = [m for m in modules if "Conv" in type(m).__name__ and ".quantized." in type(m).__module__]
    assert len(int8_convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert q.info["images"] == 6 and q.info["engine"] and q.info["torch"] == torch.__version__


def test_static_int8_rebuilds_exactly_from_its_state(one_thread):
    model = _model(num_classes=10)
    q = calibrate_static(model, _batches(2, 32))
    again = StaticInt8(model, q.state, q.info)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(q(x), again(x))
    broken = dict(q.state)
    broken.pop(next(iter(broken)))
    with pytest.raises(ValueError, match="calibration state does not match"):
        StaticInt8(model, broken, q.info)


def test_frozen_graph_computes_the_fx_function(one_thread):
    q = calibrate_static(_model(num_classes=10), _batches(2, 32))
    for shape in [(1, 3, 32, 32), (3, 3, 40, 36), (1, 3, 32, 32)]:
        x = torch.randn(shape)
        q.frozen = True
        fast = q(x)
        q.frozen = False
        assert torch.equal(fast, q(x)), shape
    assert {shape for shape, _ in q._frozen_graphs} == {(1, 3, 32, 32), (3, 3, 40, 36)}


def test_optimize_static_int8_and_its_arguments(one_thread):
    model = _model(num_classes=10)
    fast = optimize(model, dtype="int8", calibration=_batches(2, 32))
    assert fast.mode == "static" and fast.precision == "int8"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fast(x), model(x)) <= INT8
    with pytest.raises(ValueError, match="calibration applies to dtype 'int8'"):
        optimize(model, dtype="bf16", calibration=_batches(1, 32))
    with pytest.raises(ValueError, match="CPU path"):
        optimize(model, device="cuda", dtype="int8", calibration=_batches(1, 32))
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_static(model, [])


def test_cpu_feature_checks():
    assert not cpu_has_native_bf16(set()) and not cpu_has_native_bf16({"avx2", "avx512f"})
    assert cpu_has_native_bf16({"avx512_bf16"}) and cpu_has_native_bf16({"amx_bf16"})
    assert not cpu_has_int8_dot({"avx2", "fma"}) and not cpu_has_int8_dot({"avx512f"})
    assert cpu_has_int8_dot({"avx512_vnni"}) and cpu_has_int8_dot({"avx_vnni"})


@pytest.fixture
def weights_file(tmp_path):
    model = _model(num_classes=10, middle_blocks=1)
    model.class_names = [str(i) for i in range(10)]
    model.preprocessing = xception.Preprocessing(image_size=32, crop_pct=1.0)
    return save_safetensors(model, tmp_path / "w.safetensors"), model


def test_quantize_file_round_trip(weights_file, tmp_path, one_thread):
    path, model = weights_file
    q = calibrate_static(model, _batches(2, 32), info={"calibration_data": "test"})
    out = save_int8(q, tmp_path / "q.safetensors")
    file = read_weights(out)
    assert file.int8["info"]["calibration_data"] == "test" and set(file.int8["state"]) == set(q.state)
    assert not [k for k in file.state_dict if k.startswith("int8")]  # the weights stay the fp32 ones
    loaded = load_model(out, device="cpu")
    assert isinstance(loaded, StaticInt8) and loaded.class_names == model.class_names
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), q(x))
    plain = load_model(out, device="cpu", int8=False)
    assert not isinstance(plain, StaticInt8)
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-6
    fp32 = load_model(path, device="cpu")
    assert int8_model(fp32) is fp32  # a file without calibration stays fp32
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out), framework="pt") as f:  # a calibration that lost one observer
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop(next(k for k in tensors if k.startswith("int8_calibration.")))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"bad\.safetensors: int8 calibration state does not match"):
        load_model(tmp_path / "bad.safetensors", device="cpu")


def test_quantize_cli_then_predict_eval_bench_export(weights_file, tmp_path, capsys, one_thread):
    path, _ = weights_file
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--weights", str(path), "--calibrate", "digits", "--out", str(out), "--images", "8",
                 "--batch-size", "4"]) == 0
    info = read_weights(out).int8["info"]
    assert info["images"] == 8 and info["calibration_data"] == "digits" and info["weights"] == str(path)
    capsys.readouterr()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    assert main(["predict", "--weights", str(out), "--device", "cpu", str(tmp_path / "a.png")]) == 0
    assert "a.png" in capsys.readouterr().out
    assert main(["eval", "--weights", str(out), "--data", "digits", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["top1"] <= 100
    assert main(["bench", "--weights", str(out), "--dtype", "int8", "--compare", "", "--repeats", "1",
                 "--min-round-s", "0", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert row["mode"] == "static-int8-file" and row["parity_ok"], row
    from xception.deploy import kernels as cpu

    assert report["int8_kernels"] == ("ours" if cpu.load() else f"pytorch ({cpu.unavailable_reason()})")
    assert main(["export", "--weights", str(out), "--format", "torchscript", str(tmp_path / "q.pt")]) == 0
    assert "vs PyTorch int8" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    int8 = load_model(out, device="cpu")
    exported = torch.jit.load(str(tmp_path / "q.pt"))
    assert "xception::" not in str(exported.inlined_graph)  # PyTorch's ops only: the file loads anywhere
    with quantized_engine(STATIC_ENGINE):  # loaded for the engine our int8 model runs: the same function
        int8.kernels = False
        assert relative_error(torch.jit.load(str(tmp_path / "q.pt"))(x), int8(x)) <= 1e-4
    # loaded for another engine (weights repacked), or against our depthwise kernel: int8 rounding only
    int8.kernels = True
    assert relative_error(torch.jit.load(str(tmp_path / "q.pt"))(x), int8(x)) <= 1e-2
    assert main(["export", "--weights", str(out), "--format", "onnx", str(tmp_path / "q.onnx")]) == 2
    assert "int8 weights export as TorchScript only" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_cli_bad_inputs(weights_file, tmp_path, capsys):
    path, _ = weights_file
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--weights", str(path), "--calibrate", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--weights", str(tmp_path / "missing.safetensors"), "--calibrate", "digits",
                 "--out", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--weights", str(path), "--calibrate", "digits", "--out",
                 str(tmp_path / "no" / "q.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
