"""Backbone use of every registered model: feature maps, output stride, drop path, checkpointing."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from model_names import distinct_models

import xception
from xception import FeatureExtractor, create_model, list_models
from xception.models.features import feature_take_indices

README = Path(__file__).resolve().parents[2] / "README.md"
SIZE = 64  # feature-map tests
TRAIN_SIZE = 48  # training-mode tests (forward + backward)


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_side(name: str, size: int, reduction: int) -> int:
    """Feature-map side at ``reduction``: the seed's stem is unpadded, everything else halves with ceil."""
    side = (size - 3) // 2 - 1 if name == "xception" else math.ceil(size / 2)
    r = 2
    while r < reduction:
        side, r = math.ceil(side / 2), r * 2
    return side


def subsample(x: torch.Tensor, step: int) -> torch.Tensor:
    return x[..., ::step, ::step]


@pytest.mark.parametrize("name", distinct_models())
def test_features_at_every_output_stride(name):
    """feature_info and map shapes at output stride 32/16/8; the same weights load at each, and the
    dilated maps hold the stride-32 values at every (32/os)-th position (the skips are consistent)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    ref_state, ref_maps = None, None
    for os_ in (32, 16, 8):
        model = create_model(name, output_stride=os_).eval()
        info = model.feature_info
        assert [d["reduction"] for d in info] == [min(r, os_) for r in (2, 4, 8, 16, 32)]
        assert all(isinstance(d["module"], str) and d["num_chs"] > 0 for d in info)
        state = model.state_dict()
        if ref_state is None:
            ref_state = state
            for v in ref_state.values():  # random BN parameters and statistics
                if v.is_floating_point() and v.ndim == 1:
                    v.uniform_(0.5, 1.5)
        else:
            assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref_state.items()}
            model.load_state_dict(ref_state, strict=True)
        with torch.no_grad():
            final, maps = model.forward_intermediates(x)
        assert len(maps) == 5
        for d, m in zip(info, maps):
            side = expected_side(name, SIZE, d["reduction"])
            assert tuple(m.shape) == (1, d["num_chs"], side, side), (name, os_, d)
        # the last tap is the final map (before the pre-activation models' closing ReLU)
        torch.testing.assert_close(torch.relu(maps[-1]), final)
        if ref_maps is None:
            ref_maps = maps
        else:
            for r, (want, got) in enumerate(zip(ref_maps, maps)):
                step = 2 ** (r + 1) // info[r]["reduction"]  # stride-32 reduction / this one
                torch.testing.assert_close(subsample(got, step), want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("name", distinct_models())
def test_features_only_model(name):
    extractor = create_model(name, features_only=True, out_indices=(1, -1), output_stride=16)
    assert isinstance(extractor, FeatureExtractor)
    full_info = extractor.model.feature_info
    assert extractor.out_indices == (1, 4)
    assert extractor.feature_info.channels() == [full_info[1]["num_chs"], full_info[4]["num_chs"]]
    assert extractor.feature_info.reduction() == [4, 16]
    assert extractor.model_name == name
    assert isinstance(extractor.model.get_classifier(), torch.nn.Identity)
    x = torch.randn(1, 3, SIZE, SIZE)
    extractor.eval()
    with torch.no_grad():
        maps = extractor(x)
    assert [m.shape[1] for m in maps] == extractor.feature_info.channels()
    side = [expected_side(name, SIZE, r) for r in (4, 16)]
    assert [tuple(m.shape[-2:]) for m in maps] == [(s, s) for s in side]


def test_forward_intermediates_indices_and_stop_early():
    model = create_model("xception", num_classes=0).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        _, all_maps = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early_x, early = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        assert torch.equal(model.forward_features(x), all_maps[-1])
        block1, block2, block3 = list(model.blocks)[:3]
        through_block3 = block3(block2(block1(model.stem(x))))
    assert [m.shape for m in last2] == [m.shape for m in all_maps[3:]]
    assert torch.equal(early[1], all_maps[2]) and torch.equal(early[0], all_maps[0])
    assert model.feature_taps[2] == 2  # tap 2 is inside block3 ...
    assert torch.equal(early_x, through_block3)  # ... which is the last block run
    with pytest.raises(ValueError, match="feature index"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="features_only"):
        create_model("xception", out_indices=(1,))
    assert feature_take_indices(5, (-1, 0)) == ([0, 4], 4)


@pytest.mark.parametrize("name", distinct_models())
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, output_stride=16, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", ["xception", "xception41p"])
def test_drop_path_acts_in_training_only(name):
    torch.manual_seed(0)
    model = create_model(name, drop_path_rate=0.5, num_classes=4)
    plain = create_model(name, num_classes=4)
    plain.load_state_dict(model.state_dict())
    rates = [b.drop_path for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    x = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.train(), plain.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
        c, d = plain(x), plain(x)
    assert torch.equal(c, d)  # without drop path the training forward is deterministic
    assert not torch.allclose(a, b)  # with it, each forward drops different residual branches


@pytest.mark.parametrize("name", ["xception", "xception41p"])
def test_grad_checkpointing_matches_plain(name):
    """Same gradients, same batch-norm running statistics, and the blocks really are recomputed."""
    torch.manual_seed(0)
    plain = create_model(name, num_classes=5, drop_path_rate=0.2, output_stride=16).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)
    target = torch.tensor([1, 3])
    calls = {"plain": 0, "ckpt": 0}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        list(model.blocks)[-1].register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    for model in (plain, ckpt):
        torch.manual_seed(42)  # same drop-path draws
        torch.nn.functional.cross_entropy(model(x), target).backward()
    assert calls == {"plain": 1, "ckpt": 2}  # forward + recomputation in backward
    grads = dict(ckpt.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    ckpt_state = ckpt.state_dict()
    for n, v in plain.state_dict().items():
        if "running" in n or "num_batches" in n:
            assert torch.equal(ckpt_state[n], v), n  # updated once, not twice
    assert int(plain.state_dict()[next(k for k in ckpt_state if k.endswith("num_batches_tracked"))]) == 1


def test_grad_checkpointing_features_only():
    torch.manual_seed(0)
    plain = create_model("xception41", features_only=True, out_indices=(2, 3)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)
    for model in (plain, ckpt):
        sum(m.square().mean() for m in model(x)).backward()
    grads = dict(ckpt.named_parameters())
    for n, p in plain.named_parameters():
        if p.grad is None:
            assert grads[n].grad is None, n
        else:
            torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_readme_backbone_example_runs():
    text = README.read_text()
    section = text.split("## Backbone use", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape[-2:] == scope["images"].shape[-2:]
    assert torch.isfinite(scope["loss"])
    assert scope["encoder"].feature_info.reduction() == [4, 16]


def test_public_names():
    for n in ("AlignedXception", "AlignedXceptionConfig", "FeatureExtractor", "FeatureInfo"):
        assert n in xception.__all__ and hasattr(xception, n)
    for n in ("xception41", "xception65", "xception71", "xception41p", "xception65p"):
        assert n in list_models()
    for n in ("xception", "xception65p"):  # both config classes round-trip through create_model
        model = create_model(n, num_classes=7, output_stride=8)
        again = create_model(model.model_name, **dataclasses.asdict(model.config))
        assert again.config == model.config
    with pytest.raises(ValueError, match="depth"):
        create_model("xception65", depth=41)
    with pytest.raises(ValueError, match="output_stride"):
        create_model("xception65", output_stride=4)
