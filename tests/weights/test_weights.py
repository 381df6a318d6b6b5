"""Loading, converting and downloading weights (no Keras needed here; parity is in test_parity.py)."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import xception
from weight_files import randomize, serve_folder, write_keras_h5
from xception import weights as W
from xception.cli import main

ROOT = Path(__file__).resolve().parents[2]


def assert_same_tensors(a: dict, b: dict, skip: str | None = None) -> None:
    keys = [k for k in a if not (skip and k.startswith(skip))]
    assert sorted(keys) == sorted(k for k in b if not (skip and k.startswith(skip)))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return randomize(xception.create_model("xception"))


@pytest.fixture(scope="module")
def pth(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pth") / "xception.pth"
    torch.save(model.state_dict(), path)
    return path


# ---- Keras layout, written by hand (weight_files.py; the parity test uses Keras's own writer) ----


@pytest.mark.parametrize("variant", ["keras2_top", "keras3_notop_full_model"])
def test_keras_h5_layouts(model, tmp_path, variant):
    top = variant == "keras2_top"
    if top:
        path = write_keras_h5(model, tmp_path / "top.h5", suffix=":0")
    else:
        path = write_keras_h5(model, tmp_path / "notop.h5", suffix="", full_model=True, include_top=False)
    loaded = xception.create_model("xception", pretrained=path)
    assert loaded.config.bn_eps == 1e-3 and loaded.config.pool_padding == "same"
    assert loaded.config.num_classes == (1000 if top else 0)
    assert_same_tensors(loaded.state_dict(), model.state_dict(), skip=None if top else "fc.")


def test_keras_h5_of_another_model(tmp_path):
    path = tmp_path / "resnet.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        g = f.create_group("conv1_conv")
        g.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
        g.create_dataset("conv1_conv/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
    with pytest.raises(ValueError, match="resnet.h5.*not a Keras Xception.*conv1_conv"):
        xception.create_model("xception", pretrained=path)


# ---- timm / Cadene state dicts -------------------------------------------------------------------


def cadene_old_layout(state: dict) -> dict:
    """Cadene's live model / old file: last_linear, depthwise (C,3,3), pointwise (O,C), no counters."""
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("fc."):
            k = "last_linear." + k[3:]
        if v.ndim == 4 and v.shape[1] == 1 and v.shape[2:] == (3, 3):
            v = v.reshape(v.shape[0], 3, 3)
        elif v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v.reshape(v.shape[:2])
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["plain", "ddp_wrapped", "compiled_wrapped", "cadene_old"])
def test_state_dict_layouts(model, pth, tmp_path, layout):
    state = model.state_dict()
    if layout == "plain":
        path = pth
    else:
        path = tmp_path / f"{layout}.pth"
        if layout == "ddp_wrapped":
            obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
        elif layout == "compiled_wrapped":
            obj = {"model": {"module._orig_mod." + k: v for k, v in state.items()}}
        else:
            obj = cadene_old_layout(state)
        torch.save(obj, path)
    loaded = xception.create_model("xception", pretrained=path)
    assert loaded.config.bn_eps == 1e-5 and loaded.config.pool_padding == "torch"
    keep = (lambda k: "num_batches_tracked" not in k) if layout == "cadene_old" else (lambda k: True)
    assert_same_tensors({k: v for k, v in loaded.state_dict().items() if keep(k)},
                        {k: v for k, v in state.items() if keep(k)})


def test_fine_tune_other_class_count(model, pth, caplog):
    with caplog.at_level(logging.INFO, logger="xception.weights"):
        tuned = xception.create_model("xception", pretrained=pth, num_classes=10)
    assert tuned.fc.weight.shape == (10, 2048)
    assert "classifier" in caplog.text
    assert_same_tensors(tuned.state_dict(), model.state_dict(), skip="fc.")
    features = xception.create_model("xception", pretrained=pth, num_classes=0)
    assert isinstance(features.fc, nn.Identity)


def test_load_weights_strict_class_count(pth):
    target = xception.create_model("xception", num_classes=10)
    before = target.fc.weight.clone()
    with pytest.raises(ValueError, match=r"xception\.pth.*fc\.weight.*\(1000, 2048\).*\(10, 2048\)"):
        xception.load_weights(target, pth)
    xception.load_weights(target, pth, strict=False)
    assert torch.equal(target.fc.weight, before)
    assert torch.equal(target.conv1.weight, torch.load(pth, weights_only=True)["conv1.weight"])


def test_adapt_state_dict_hook(model, tmp_path):
    class Renamed(xception.Xception):
        def adapt_state_dict(self, state):
            return {k.replace("entry.", "", 1): v for k, v in state.items()}

    path = tmp_path / "renamed.pth"
    torch.save({"entry." + k: v for k, v in model.state_dict().items()}, path)
    target = xception.load_weights(Renamed(), path)
    assert_same_tensors(target.state_dict(), model.state_dict())


# ---- our formats ---------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    small = randomize(xception.create_model("xception", num_classes=3, middle_blocks=1, drop_rate=0.2))
    path = xception.save_safetensors(small, tmp_path / "small.safetensors", class_names=["a", "b", "c"])
    assert [p.name for p in tmp_path.iterdir()] == ["small.safetensors"]  # no temp file left
    loaded = xception.create_model("xception", pretrained=path).eval()
    assert loaded.config == small.config and loaded.class_names == ["a", "b", "c"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    with pytest.raises(ValueError, match="small.safetensors"):
        xception.create_model("xception", pretrained=path, middle_blocks=2)


def test_wrapped_models_save_and_load_plain_keys(tmp_path):
    small = randomize(xception.create_model("xception", num_classes=2, middle_blocks=0))
    path = xception.save_safetensors(nn.DataParallel(small), tmp_path / "wrapped.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "conv1.weight" in f.keys() and not any(k.startswith("module.") for k in f.keys())
    target = xception.create_model("xception", num_classes=2, middle_blocks=0)
    wrapped = nn.DataParallel(target)
    assert xception.load_weights(wrapped, path) is wrapped
    assert_same_tensors(target.state_dict(), small.state_dict())
    assert xception.create_model("xception", pretrained=path).training  # like create_model: train mode


def test_training_checkpoint_prefers_ema(tmp_path):
    small = randomize(xception.create_model("xception", num_classes=2, middle_blocks=0))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in small.state_dict().items()}
    ckpt = {"format": "xception-checkpoint", "model_name": "xception", "config": small.config.to_dict(),
            "model": small.state_dict(), "ema": ema, "class_names": ["cat", "dog"], "epoch": 4}
    torch.save(ckpt, tmp_path / "best.pt")
    loaded = xception.create_model("xception", pretrained=tmp_path / "best.pt")
    assert_same_tensors(loaded.state_dict(), ema)
    assert loaded.class_names == ["cat", "dog"]
    torch.save({**ckpt, "ema": None}, tmp_path / "last.pt")
    assert_same_tensors(xception.create_model("xception", pretrained=tmp_path / "last.pt").state_dict(),
                        small.state_dict())


def test_convert_cli_and_torch_hub(model, pth, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(pth), str(dst)]) == 0
    assert "out.safetensors" in capsys.readouterr().out
    x = torch.randn(1, 3, 71, 71)
    converted = xception.create_model("xception", pretrained=dst).eval()
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    hub = torch.hub.load(str(ROOT), "xception", source="local", pretrained=str(dst))
    assert_same_tensors(hub.state_dict(), model.state_dict())

    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    assert main(["convert", str(dst), str(tmp_path / "x.safetensors"), "--model", "resnet50"]) == 2
    assert "resnet50" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ---- bad input -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        xception.create_model("xception", pretrained=tmp_path / "absent.h5")


@pytest.mark.parametrize("kind", ["pth", "h5", "safetensors"])
def test_truncated_files(model, pth, tmp_path, kind):
    if kind == "pth":
        full = pth
    elif kind == "h5":
        full = write_keras_h5(model, tmp_path / "full.h5")
    else:
        full = xception.save_safetensors(model, tmp_path / "full.safetensors")
    data = full.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cut.{kind}"):
        xception.create_model("xception", pretrained=cut)


def test_state_dict_of_another_architecture(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as info:
        xception.create_model("xception", pretrained=path)
    message = str(info.value)
    assert "resnet18.pth" in message and "missing" in message and "unexpected" in message
    assert "layer1.0.conv1.weight" in message or "mis-shaped" in message


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": torch.zeros(1), "x": Exploit(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pth"):
        xception.create_model("xception", pretrained=path)
    assert not marker.exists()


# ---- downloads (loopback server only) ------------------------------------------------------------


@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with serve_folder(served) as (base, hits):
        yield served, base, hits


def test_download_verify_cache(server, tmp_path, monkeypatch):
    served, base, hits = server
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    small = randomize(xception.create_model("xception", middle_blocks=0))
    torch.save(small.state_dict(), served / "xception-tiny.pth")
    sha = hashlib.sha256((served / "xception-tiny.pth").read_bytes()).hexdigest()
    monkeypatch.setitem(W.REMOTE_WEIGHTS, "timm", W.RemoteWeights(f"{base}/xception-tiny.pth", sha256_prefix=sha[:9]))

    loaded = xception.create_model("xception", pretrained="timm", middle_blocks=0)
    assert_same_tensors(loaded.state_dict(), small.state_dict())
    cache = tmp_path / "hub" / "checkpoints"
    assert [p.name for p in cache.iterdir()] == ["xception-tiny.pth"]
    assert len(hits) == 1
    xception.create_model("xception", pretrained="timm", middle_blocks=0)
    assert len(hits) == 1  # the verified cached file was reused

    (cache / "xception-tiny.pth").write_bytes(b"corrupt")  # a bad cached file is fetched again
    assert W.download_weights("timm", progress=False) == cache / "xception-tiny.pth"
    assert len(hits) == 2 and (cache / "xception-tiny.pth").stat().st_size > 100

    monkeypatch.setitem(W.REMOTE_WEIGHTS, "timm", W.RemoteWeights(f"{base}/xception-tiny.pth", sha256_prefix="000000000"))
    (cache / "xception-tiny.pth").unlink()
    with pytest.raises(ValueError, match="checksum"):
        W.download_weights("timm", progress=False)
    assert list(cache.iterdir()) == []  # no half or unverified file left


def test_md5_verification(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"keras weights")
    good = W.RemoteWeights("http://127.0.0.1/w.h5", md5=hashlib.md5(b"keras weights").hexdigest())
    bad = W.RemoteWeights("http://127.0.0.1/w.h5", md5="0a58e3b7378bc2990ea3b43d5981f1f6")
    assert good.verify(path) and not bad.verify(path)
    with pytest.raises(ValueError, match="'imagenet'"):
        W.download_weights("imagenet")

