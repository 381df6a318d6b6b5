"""The seed model: structure, parameter count, options, input checks."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xception
from xception.models.config import XceptionConfig
from xception.models.layers import MaxPool2dSame

SEED_TREE = Path(__file__).with_name("seed_module_tree.txt")


def _normalise_tree(text: str) -> list[str]:
    # Newer PyTorch prints BatchNorm2d with an extra "bias=True"; the module is the same.
    return [line.strip().replace(", bias=True, track", ", track") for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def seed_model(randomise_bn) -> xception.Xception:
    torch.manual_seed(0)
    model = xception.create_model("xception").eval()
    randomise_bn(model, torch.Generator().manual_seed(1))
    return model


def test_printed_module_tree_equals_the_seeds(seed_model):
    assert _normalise_tree(str(seed_model)) == _normalise_tree(SEED_TREE.read_text())


def test_parameter_count_and_keys_match_the_seed_and_timm(seed_model):
    assert sum(p.numel() for p in seed_model.parameters()) == 22_855_952
    timm = pytest.importorskip("timm")
    ref = timm.create_model("legacy_xception", pretrained=False)
    ours = {k: v.shape for k, v in seed_model.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert list(ours) == list(theirs)
    assert ours == theirs


def test_seed_initialisation():
    model = xception.create_model("xception")
    w = model.block4.rep[1].pointwise.weight  # 728 -> 728 1x1: std sqrt(2 / 728)
    assert abs(w.std().item() - (2 / 728) ** 0.5) < 0.05 * (2 / 728) ** 0.5
    dw = model.block4.rep[1].conv1.weight  # depthwise 3x3 over 728 outputs
    assert abs(dw.std().item() - (2 / (9 * 728)) ** 0.5) < 0.1 * (2 / (9 * 728)) ** 0.5
    assert torch.all(model.bn3.weight == 1) and torch.all(model.bn3.bias == 0)


def test_backward_reaches_every_parameter():
    model = xception.create_model("xception", num_classes=5)
    out = model(torch.randn(2, 3, 40, 40))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("size", [7, 40, 71, 99, 128])
def test_every_reducible_input_size(seed_model, size):
    with torch.no_grad():
        feats = seed_model.forward_features(torch.randn(1, 3, size, size))
    side = (size - 3) // 2 - 1  # after the two unpadded stem convs
    for _ in range(4):
        side = -(-side // 2)
    assert feats.shape == (1, 2048, side, side)
    assert torch.isfinite(feats).all()


def test_too_small_or_wrong_inputs_raise_clear_errors(seed_model):
    with pytest.raises(ValueError, match="minimum is 7x7"):
        seed_model(torch.randn(1, 3, 6, 50))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        seed_model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        seed_model(torch.randn(3, 32, 32))


def test_forward_is_head_of_features(seed_model):
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = seed_model.forward_features(x)
        assert torch.all(feats >= 0)  # after the final ReLU
        pre = seed_model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        torch.testing.assert_close(seed_model(x), seed_model.fc(pre))


def test_num_classes_zero_gives_pooled_features():
    model = xception.create_model("xception", num_classes=0).eval()
    assert "fc.weight" not in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_in_chans():
    model = xception.create_model("xception", in_chans=1, num_classes=3)
    assert model.conv1.weight.shape == (32, 1, 3, 3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_drop_rate_acts_in_training_only():
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=0, drop_rate=0.5)
    feats = torch.rand(4, 2048, 3, 3) + 0.5  # positive, so a zero can only come from dropout
    pooled = feats.mean(dim=(2, 3))
    model.train()
    out = model.forward_head(feats)
    dropped = out == 0
    assert 0.4 < dropped.float().mean().item() < 0.6
    torch.testing.assert_close(out[~dropped], 2 * pooled[~dropped])  # inverted dropout scaling
    model.eval()
    torch.testing.assert_close(model.forward_head(feats), pooled)
    no_drop = xception.create_model("xception", num_classes=0).train()
    torch.testing.assert_close(no_drop.forward_head(feats), pooled)


def test_global_pool_max(seed_model):
    model = xception.create_model("xception", global_pool="max").eval()
    model.load_state_dict(seed_model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(dim=(2, 3)))
        assert not torch.allclose(model(x), seed_model(x))


def test_middle_blocks():
    model = xception.create_model("xception", middle_blocks=2)
    names = [n for n, _ in model.named_children() if n.startswith("block")]
    assert names == [f"block{i}" for i in range(1, 7)]
    assert model.block6.skip is not None  # the exit block keeps its projection
    per_middle_block = sum(p.numel() for p in xception.create_model().block4.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == 22_855_952 - 6 * per_middle_block
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_intermediate_activation_changes_the_function(seed_model):
    for act, cls in (("relu", nn.ReLU), ("elu", nn.ELU)):
        model = xception.create_model("xception", intermediate_activation=act).eval()
        model.load_state_dict(seed_model.state_dict())  # no new parameters
        assert isinstance(model.block4.rep[1].act, cls)
        assert isinstance(model.conv3.act, cls)
        x = torch.randn(1, 3, 48, 48)
        with torch.no_grad():
            assert not torch.allclose(model(x), seed_model(x))
            sep = model.block4.rep[1]
            y = torch.randn(1, 728, 5, 5)
            expected = sep.pointwise(cls()(sep.conv1(y)))
            torch.testing.assert_close(sep(y), expected)
    assert seed_model.block4.rep[1].act is None


def test_residual_off_removes_the_skip_path(seed_model):
    model = xception.create_model("xception", residual=False).eval()
    assert not any("skip" in k for k in model.state_dict())
    state = {k: v for k, v in seed_model.state_dict().items() if "skip" not in k}
    model.load_state_dict(state)
    with torch.no_grad():
        y = torch.randn(1, 728, 5, 5)
        torch.testing.assert_close(model.block4(y), seed_model.block4.rep(y))
        assert not torch.allclose(model.block4(y), seed_model.block4(y))


def test_bn_eps_reaches_every_norm():
    model = xception.create_model("xception", bn_eps=1e-3)
    eps = {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {1e-3}


def test_maxpool_same_matches_tensorflow_padding():
    pool = MaxPool2dSame(3, 2)
    even = torch.randn(1, 2, 8, 10)
    torch.testing.assert_close(pool(even), F.max_pool2d(F.pad(even, (0, 1, 0, 1), value=-torch.inf), 3, 2))
    odd = torch.randn(1, 2, 9, 7)
    torch.testing.assert_close(pool(odd), F.max_pool2d(odd, 3, 2, padding=1))
    mixed = torch.randn(1, 2, 9, 10)
    torch.testing.assert_close(pool(mixed), F.max_pool2d(F.pad(mixed, (0, 1, 1, 1), value=-torch.inf), 3, 2))
    assert not torch.allclose(pool(even), F.max_pool2d(even, 3, 2, padding=1))


def test_pool_padding_same_differs_only_on_even_pool_inputs(seed_model):
    model = xception.create_model("xception", pool_padding="same").eval()
    model.load_state_dict(seed_model.state_dict())
    with torch.no_grad():
        odd = torch.randn(1, 3, 39, 39)  # every pool sees 17, 9, 5, 3: odd sizes, identical
        torch.testing.assert_close(model(odd), seed_model(odd))
        even = torch.randn(1, 3, 42, 42)  # the first pool sees 18: TF pads after only
        assert not torch.allclose(model(even), seed_model(even))


def test_channels_last_input(seed_model):
    x = torch.randn(2, 3, 45, 45)
    with torch.no_grad():
        ref = seed_model(x)
        out = seed_model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_reset_classifier():
    model = xception.create_model("xception")
    model.reset_classifier(7)
    assert model.fc.out_features == 7 and model.config.num_classes == 7
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0, global_pool="max")
    assert model.config.global_pool == "max"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_config_is_frozen_and_validated():
    config = XceptionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_classes = 3  # type: ignore[misc]
    for bad in ({"global_pool": "sum"}, {"pool_padding": "valid"}, {"intermediate_activation": "gelu"},
                {"num_classes": -1}, {"drop_rate": 1.0}, {"output_stride": 4}, {"bn_eps": 0}):
        with pytest.raises(ValueError, match=re.escape(repr(next(iter(bad.values()))))):
            XceptionConfig(**bad)
    with pytest.raises(ValueError, match="unknown XceptionConfig option"):
        XceptionConfig.from_dict({"num_classes": 3, "depth": 5})
    assert XceptionConfig.from_dict(config.to_dict()) == config


def test_registry():
    assert "xception" in xception.list_models()
    model = xception.create_model("xception", num_classes=4)
    assert model.model_name == "xception" and model.config.num_classes == 4
    rebuilt = xception.create_model(model.model_name, **dataclasses.asdict(model.config))
    assert rebuilt.config == model.config
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        xception.create_model("resnet50")
