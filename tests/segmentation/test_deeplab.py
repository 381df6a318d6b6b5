"""DeepLabv3+: shapes on every backbone, output stride after loading, checkpointing, weights files,
and the ``xception segment`` commands end to end on a small synthetic set."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xception import list_models
from xception.cli import main
from xception.segmentation import DeepLabV3Plus, load_deeplab, save_deeplab
from xception.segmentation.model import atrous_depthwise
from xception.segmentation.synthetic import make_shapes
from xception.segmentation.weights import tf_variable_names

SMALL = {"xception": {"middle_blocks": 0}, "xception41": {}, "xception41p": {}}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("backbone", list_models())
def test_logits_at_the_input_size_on_every_backbone(backbone):
    model = DeepLabV3Plus(backbone=backbone, num_classes=4, encoder_options=SMALL.get(backbone, {})).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 91))  # not a multiple of 16
    assert out.shape == (1, 4, 75, 91)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["xception41", "xception"])
def test_output_stride_changes_after_loading_with_the_same_weights(backbone):
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone=backbone, num_classes=3, encoder_options=SMALL[backbone])
    _randomize_bn(model)
    model.eval()
    x = torch.randn(1, 3, 67, 83)
    params = [id(p) for p in model.parameters()]
    model.set_output_stride(8)
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before still holds them
    built_at_8 = DeepLabV3Plus(backbone=backbone, num_classes=3, output_stride=8, encoder_options=SMALL[backbone])
    built_at_8.load_state_dict(model.state_dict())
    with torch.no_grad():
        y8, ref8 = model(x), built_at_8.eval()(x)
        h8, w8 = model.encode(x)[0].shape[-2:]
        model.set_output_stride(16)
        h16, w16 = model.encode(x)[0].shape[-2:]
    assert h8 >= 2 * h16 - 2 and w8 >= 2 * w16 - 2  # the encoder's map at stride 8, then 16
    assert torch.equal(y8, ref8)
    assert model.aspp.atrous[0].conv_dw.dilation == (6, 6)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("rate,size,bias", [(6, (32, 32), False), (12, (33, 29), True), (18, (16, 16), False),
                                             (36, (7, 40), True), (9, (12, 9), False), (2, (1, 5), True)])
def test_atrous_depthwise_as_shifted_sums_equals_the_conv(rate, size, bias, layout):
    """The CPU path of shifted sums (channels-last from rate 5; NCHW where the rate reaches a side,
    so that whole rows or columns of taps read padding) equals the conv, values and gradients;
    elsewhere the conv itself runs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 24, 3, 1, rate, rate, groups=24, bias=bias)
    x = torch.randn(2, 24, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        shifted = rate >= 5
    else:
        shifted = rate >= min(size)
    x.requires_grad_()
    calls = []
    handle = conv.register_forward_hook(lambda *args: calls.append(1))
    ours = atrous_depthwise(conv, x)
    assert bool(calls) != shifted  # the shifted sums ran instead of the conv, or the conv ran
    handle.remove()
    ref = F.conv2d(x, conv.weight, conv.bias, 1, rate, rate, 24)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.square().sum(), (x, conv.weight)),
                    torch.autograd.grad(ref.square().sum(), (x, conv.weight))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="xception41", num_classes=3)
    x, target = torch.randn(2, 3, 48, 48), torch.randint(0, 3, (2, 48, 48))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)  # the same dropout draws
        torch.nn.functional.cross_entropy(model(x), target).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tf_names_cover_every_tensor_once():
    model = DeepLabV3Plus(backbone="xception65", num_classes=21, head_depthwise_bn=True)
    names = tf_variable_names(model)
    assert len(set(names.values())) == len(names)
    assert names["encoder.blocks.1.stack.conv2.bn_pw.running_var"] == \
        "xception_65/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise/BatchNorm/moving_variance"
    assert names["encoder.blocks.20.stack.conv3.conv_dw.weight"] == \
        "xception_65/exit_flow/block2/unit_1/xception_module/separable_conv3_depthwise/depthwise_weights"
    assert names["aspp.atrous.2.conv_pw.weight"] == "aspp3_pointwise/weights"
    assert names["decoder.conv1.bn_dw.running_mean"] == "decoder/decoder_conv1_depthwise/BatchNorm/moving_mean"
    assert names["classifier.bias"] == "logits/semantic/biases"
    with pytest.raises(ValueError, match="xception41p"):
        tf_variable_names(DeepLabV3Plus(backbone="xception41p", num_classes=2))
    with pytest.raises(ValueError, match="head_depthwise_bn=True"):  # the default head has no depthwise BN
        tf_variable_names(DeepLabV3Plus(backbone="xception65", num_classes=21))


def test_safetensors_round_trip_keeps_config_and_classes(tmp_path):
    model = DeepLabV3Plus(backbone="xception", num_classes=3, encoder_options={"middle_blocks": 0},
                          head_depthwise_bn=True).eval()
    path = save_deeplab(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    loaded = load_deeplab(path, output_stride=8)
    assert loaded.class_names == ["a", "b", "c"] and loaded.config.output_stride == 8
    assert loaded.config.head_depthwise_bn
    model.set_output_stride(8)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    bad = tmp_path / "other.safetensors"
    save_deeplab(DeepLabV3Plus(backbone="xception", num_classes=5, encoder_options={"middle_blocks": 0}), bad)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_deeplab(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_deeplab(tmp_path / "missing.safetensors")


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _cli(capsys, *args, code=0):
    """``xception ARGS`` in this process: (stdout, stderr), the exit code checked."""
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == code, err[-2000:]
    return out, err


@pytest.mark.slow
def test_segment_commands_end_to_end(tmp_path, capsys):
    data = make_shapes(tmp_path / "shapes", train=6, val=3, size=40)
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--backbone", "xception", "--encoder-options", "middle_blocks=0",
              "--batch-size", "3", "--crop-size", "40", "--device", "cpu", "--workers", "0"]
    _cli(capsys, "segment", "train", *common, "--epochs", "1")
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(first) == 1 and 0.0 <= first[0]["val_miou"] <= 1.0
    _cli(capsys, "segment", "train", *common, "--epochs", "2", "--resume")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2] and history[0] == first[0]

    result = json.loads(_cli(capsys, "segment", "eval", "--weights", str(run / "last.pt"), "--data", str(data),
                             "--json", "--device", "cpu", "--report", str(tmp_path / "report"))[0])
    assert result["images"] == 3 and set(result["iou"]) == {"background", "disc", "square"}
    assert abs(result["miou"] - history[-1]["val_miou"]) < 1e-9  # the same matrix as training's evaluation
    assert (tmp_path / "report" / "per_class.md").is_file() and len(list((tmp_path / "report" / "worst").iterdir())) == 3

    weights = tmp_path / "seg.safetensors"
    _cli(capsys, "segment", "convert", str(run / "last.pt"), str(weights))
    images = sorted((data / "val" / "images").iterdir())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _, err = _cli(capsys, "segment", "predict", str(images[0]), str(tmp_path / "broken.jpg"), "--weights",
                  str(weights), "--out", str(tmp_path / "masks"), "--device", "cpu", code=1)
    assert "broken.jpg" in err
    from PIL import Image

    mask = Image.open(tmp_path / "masks" / f"{images[0].stem}.png")
    assert mask.mode == "P" and mask.size == Image.open(images[0]).size
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    assert (tmp_path / "masks" / f"{images[0].stem}_overlay.jpg").is_file()

    onnx = tmp_path / "seg.onnx"
    out, _ = _cli(capsys, "segment", "export", "--weights", str(weights), str(onnx))
    assert onnx.is_file() and "97x129" in out and "160x120" in out
    errors = [float(e.split(":")[1]) for e in out.split("PyTorch: ")[1].split(", ")]
    assert max(errors) < 1e-4


def test_segment_bad_inputs_named(tmp_path, capsys):
    data = make_shapes(tmp_path / "shapes", train=2, val=1, size=24)
    (data / "train" / "masks" / "00001.png").unlink()
    _, err = _cli(capsys, "segment", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu",
                  code=2)
    assert "00001" in err and len(err.strip().splitlines()) == 1
    _, err = _cli(capsys, "segment", "eval", "--weights", str(tmp_path / "nope.safetensors"), "--data", str(data),
                  code=2)
    assert "nope.safetensors" in err and len(err.strip().splitlines()) == 1
