"""Parity with timm on copied random weights: aligned Xception-41/65/71/41p/65p and the seed's
feature maps against timm's legacy_xception; loading timm state dicts from files."""

from __future__ import annotations

import re

import pytest
import torch

import xception  # noqa: F401  (registers every model)
from xception import create_model

timm = pytest.importorskip("timm")

ALIGNED = ["xception41", "xception41p", "xception65", "xception65p", "xception71"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def random_state(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Variance-preserving random weights and random BN statistics, keyed like ``state``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in state.items():
        if not v.is_floating_point():
            out[key] = v.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(v.shape, generator=g) * 1.5 + 0.5  # U(0.5, 2)
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = torch.randn(v.shape, generator=g) * 0.1
        elif v.ndim == 1:  # BN gamma
            out[key] = torch.rand(v.shape, generator=g) + 0.5  # U(0.5, 1.5)
        else:  # conv / linear weight: He-normal over fan-in
            out[key] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    return out


def timm_features_state(features_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """timm's features_only nets flatten ``stem.0`` to ``stem_0`` (aligned) or nest under ``body.``."""
    out = {}
    for key in features_model.state_dict():
        plain = re.sub(r"^(stem|blocks)_(\d+)\.", r"\1.\2.", key.removeprefix("body."))
        out[key] = state[plain]
    return out


def check_not_degenerate(ref: torch.Tensor) -> None:
    assert torch.isfinite(ref).all()
    assert ref.std() > 1e-3 * ref.abs().mean(), "reference output is near-constant"
    assert (ref[0] - ref[1]).norm() > 1e-3 * ref.norm(), "reference output ignores the input"


def compare(name: str, timm_name: str, sizes: tuple[int, ...], output_stride: int = 32) -> None:
    kw = {} if output_stride == 32 else {"output_stride": output_stride}
    ref = timm.create_model(timm_name, pretrained=False, **kw).eval()
    ref_feats = timm.create_model(timm_name, pretrained=False, features_only=True, **kw).eval()
    ours = create_model(name, output_stride=output_stride).eval()
    state = random_state(ref.state_dict())
    ours.load_state_dict(state)  # our module names are timm's
    ref.load_state_dict(state)
    ref_feats.load_state_dict(timm_features_state(ref_feats, state))
    assert [d["num_chs"] for d in ours.feature_info] == ref_feats.feature_info.channels()
    assert [d["reduction"] for d in ours.feature_info] == ref_feats.feature_info.reduction()
    torch.manual_seed(0)
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits, want = ours(x), ref(x)
            maps, want_maps = ours.forward_intermediates(x, intermediates_only=True), ref_feats(x)
        check_not_degenerate(want)
        assert rel_l2(logits, want) <= TOL, (name, size)
        assert len(maps) == len(want_maps) == 5
        for i, (got, exp) in enumerate(zip(maps, want_maps)):
            assert got.shape == exp.shape, (name, size, i)
            check_not_degenerate(exp)
            assert rel_l2(got, exp) <= TOL, (name, size, i)


@pytest.mark.parametrize("name", ALIGNED)
def test_aligned_parity_with_timm(name):
    sizes = (64, 97) if name in ("xception65", "xception41p") else (64,)
    compare(name, name, sizes)


def test_aligned_parity_with_timm_output_stride_16():
    compare("xception65", "xception65", (64,), output_stride=16)


def test_seed_features_match_timm_legacy_xception():
    """The seed's taps are timm's legacy_xception taps (the seed's state dict is timm's)."""
    compare("xception", "legacy_xception", (71, 97))


def test_state_dict_keys_and_shapes_equal_timm():
    for name in ("xception65", "xception65p", "xception71"):
        ref = timm.create_model(name, pretrained=False).state_dict()
        ours = create_model(name).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_file_loads_through_adapter(tmp_path, fmt):
    """A timm state dict saved to disk (as timm publishes it, or wrapped by DDP) loads unchanged."""
    ref = timm.create_model("xception41p", pretrained=False).eval()
    state = random_state(ref.state_dict(), seed=3)
    ref.load_state_dict(state)
    path = tmp_path / f"xception41p.{fmt}"
    if fmt == "pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        from safetensors.torch import save_file

        # timm's hub files carry no num_batches_tracked; batch norm fills them in on load
        save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(path))
    ours = create_model("xception41p", pretrained=path).eval()  # the user's path: no key surgery
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_l2(ours(x), ref(x)) <= TOL
