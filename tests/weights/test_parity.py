"""Parity with implementations no one here wrote: timm ``legacy_xception`` and Keras ``Xception``.

Random weights *and* random batch-norm statistics go through the real files (a timm state dict
saved with torch.save; an HDF5 file written by Keras's own legacy writer), then both models run
the same inputs in fp32 on CPU. Weights are variance preserving: with tiny weights a batch norm
with random statistics outputs constants, which would hide padding and epsilon mistakes, so each
test also checks that the reference output depends on its input.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import xception

os.environ.setdefault("KERAS_BACKEND", "torch")

# Keras's torch backend converts variables with a numpy-2-deprecated __array__ signature.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def parity_errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error of the outputs, and of their input-dependent part (batch mean removed).

    With random weights an input-independent component dominates pooled outputs; the second figure
    makes sure the part that depends on the input matches as well, and that it exists at all.
    """
    centered_ref = ref - ref.mean(dim=0, keepdim=True)
    spread = float(centered_ref.norm() / ref.norm())
    assert spread > 1e-3, f"reference output barely depends on its input (spread {spread:.2e})"
    return rel_err(ours, ref), rel_err(ours - ours.mean(dim=0, keepdim=True), centered_ref)


def random_value(leaf: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Variance-preserving random value for a Keras/PyTorch weight named by its last path part."""
    if leaf == "gamma":
        v = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("beta", "moving_mean", "bias"):
        v = rng.normal(0.0, 0.1, shape)
    elif leaf == "moving_variance":
        v = rng.uniform(0.5, 2.0, shape)
    else:
        raise KeyError(leaf)
    return v.astype(np.float32)


# ---- timm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_pair(tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("legacy_xception", pretrained=False).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()  # (in/groups) * kh * kw
                gain = 1.0 if module.groups > 1 else 2.0  # depthwise: no ReLU right before the pointwise
                module.weight.normal_(0.0, math.sqrt(gain / fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.from_numpy(random_value("gamma", (n,), rng)))
                module.bias.copy_(torch.from_numpy(random_value("beta", (n,), rng)))
                module.running_mean.copy_(torch.from_numpy(random_value("moving_mean", (n,), rng)))
                module.running_var.copy_(torch.from_numpy(random_value("moving_variance", (n,), rng)))
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, math.sqrt(1.0 / module.in_features))
                module.bias.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("timm") / "legacy_xception.pth"
    torch.save(ref.state_dict(), path)
    ours = xception.create_model("xception", pretrained=path).eval()
    return ref, ours


@pytest.mark.parametrize("size", [299, 96])  # odd and even (Keras covers more sizes below)
def test_timm_logits_parity(timm_pair, size):
    ref_model, ours = timm_pair
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ref_feats = ref_model.forward_features(x)
        feats = ours.forward_features(x)
        ref = ref_model.forward_head(ref_feats)
        out = ours.forward_head(feats)
    err, err_centered = parity_errors(out, ref)
    feat_err = ((feats.double() - ref_feats.double()).norm() / ref_feats.double().norm()).item()
    print(f"timm legacy_xception {size}x{size}: relative L2 error of logits {err:.2e} "
          f"(input-dependent part {err_centered:.2e}), of forward_features {feat_err:.2e}")
    assert err <= 1e-5 and err_centered <= 1e-5
    assert feats.shape == ref_feats.shape and feat_err <= 1e-5


# ---- Keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras parity needs KERAS_BACKEND=torch")
    return keras


def randomize_keras(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for w in layer.weights:
            leaf = w.path.rsplit("/", 1)[-1]
            shape = tuple(w.shape)
            if leaf == "depthwise_kernel":  # (kh, kw, in, 1): fan-in kh*kw, no ReLU before the pointwise
                value = rng.normal(0.0, math.sqrt(1.0 / (shape[0] * shape[1])), shape)
            elif leaf in ("kernel", "pointwise_kernel"):  # (kh, kw, in, out) or Dense (in, out)
                fan_in = int(np.prod(shape[:-1]))
                value = rng.normal(0.0, math.sqrt((1.0 if len(shape) == 2 else 2.0) / fan_in), shape)
            else:
                value = random_value(leaf, shape, rng)
            w.assign(value.astype(np.float32))


def write_keras_h5(model, path) -> None:
    """Keras 3's own writer for the legacy layout (what ``model.save_weights('x.h5')`` wrote in Keras 2)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def keras_forward(model, x_nchw: torch.Tensor) -> torch.Tensor:
    from keras import ops

    y = model(x_nchw.permute(0, 2, 3, 1).numpy(), training=False)  # Keras wants NHWC
    y = torch.from_numpy(np.asarray(ops.convert_to_numpy(y)))
    return y.permute(0, 3, 1, 2) if y.ndim == 4 else y


@pytest.fixture(scope="module")
def keras_top(keras, tmp_path_factory):
    model = keras.applications.Xception(weights=None, classifier_activation=None)
    randomize_keras(model, seed=1)
    path = tmp_path_factory.mktemp("keras") / "xception_top.h5"
    write_keras_h5(model, path)
    return model, path, xception.create_model("xception", pretrained=path).eval()


@pytest.fixture(scope="module")
def keras_notop(keras, tmp_path_factory):
    model = keras.applications.Xception(weights=None, include_top=False, input_shape=(None, None, 3))
    randomize_keras(model, seed=2)
    path = tmp_path_factory.mktemp("keras") / "xception_notop.h5"
    write_keras_h5(model, path)
    ours = xception.create_model("xception", pretrained=path).eval()
    refs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # size -> (input, Keras output), computed once

    def reference(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if size not in refs:
            x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
            refs[size] = x, keras_forward(model, x)  # (B, 2048, h, w) after the final ReLU
        return refs[size]

    return path, ours, reference


def test_keras_logits_parity_299(keras_top):
    kmodel, path, ours = keras_top
    assert ours.config.bn_eps == 1e-3 and ours.config.pool_padding == "same" and ours.config.num_classes == 1000
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = keras_forward(kmodel, x)
    with torch.no_grad():
        out = ours(x)
    err, err_centered = parity_errors(out, ref)
    print(f"Keras Xception 299x299: relative L2 error of logits {err:.2e} (input-dependent part {err_centered:.2e})")
    assert err <= 1e-4 and err_centered <= 1e-4


def test_keras_logits_parity_even_size(keras, keras_top):
    # Keras fixes the input size of a model with its top: build one at 100 with the same weights,
    # loaded by Keras's own reader from the file under test.
    kmodel_299, path, ours = keras_top
    kmodel = keras.applications.Xception(weights=None, classifier_activation=None, input_shape=(100, 100, 3))
    kmodel.set_weights(kmodel_299.get_weights())
    x = torch.rand(2, 3, 100, 100, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = keras_forward(kmodel, x)
    with torch.no_grad():
        out = ours(x)
    err, err_centered = parity_errors(out, ref)
    print(f"Keras Xception 100x100: relative L2 error of logits {err:.2e} (input-dependent part {err_centered:.2e})")
    assert err <= 1e-4 and err_centered <= 1e-4


@pytest.mark.parametrize("size", [96, 81])
def test_keras_features_parity(keras_notop, size):
    path, ours, reference = keras_notop
    assert ours.config.num_classes == 0
    x, ref = reference(size)
    with torch.no_grad():
        out = ours.forward_features(x)
        pooled = ours(x)
    assert out.shape == ref.shape
    err, err_centered = parity_errors(out, ref)
    print(f"Keras Xception include_top=False {size}x{size}: relative L2 error of features {err:.2e} "
          f"(input-dependent part {err_centered:.2e})")
    assert err <= 1e-4 and err_centered <= 1e-4
    assert rel_err(pooled, ref.mean(dim=(2, 3))) <= 1e-4


def test_torch_pool_padding_does_not_match_keras_at_even_size(keras_notop):
    # The check above can fail: the seed's symmetric MaxPool2d padding differs from Keras's 'same'
    # at even sizes, and a model with PyTorch's BN epsilon differs everywhere.
    path, _, reference = keras_notop
    x, ref = reference(96)
    torch_pool = xception.create_model("xception", pretrained=path, pool_padding="torch").eval()
    torch_eps = xception.create_model("xception", pretrained=path, bn_eps=1e-5).eval()
    with torch.no_grad():
        err_pool = rel_err(torch_pool.forward_features(x), ref)
        err_eps = rel_err(torch_eps.forward_features(x), ref)
    print(f"Keras 96x96 features: pool_padding='torch' error {err_pool:.2e}, bn_eps=1e-5 error {err_eps:.2e}")
    assert err_pool > 1e-2
    assert err_eps > 1e-4


def test_keras_variants_load_identically(keras, keras_top, tmp_path):
    """Keras 2 names (``:0``) and a full-model save (weights under ``model_weights``) give the same tensors."""
    import h5py

    kmodel, path, ours = keras_top
    expected = ours.state_dict()

    full = tmp_path / "full_model.h5"
    kmodel.save(str(full))  # Keras 3 writes a ".h5" model in the legacy layout, weights under model_weights
    with h5py.File(full) as f:
        assert "model_weights" in f and "layer_names" not in f.attrs

    colon = tmp_path / "keras2_names.h5"
    with h5py.File(path) as src, h5py.File(colon, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for layer in src:
            group = dst.create_group(layer)
            names = [n.decode() if isinstance(n, bytes) else n for n in src[layer].attrs["weight_names"]]
            group.attrs["weight_names"] = [(n + ":0").encode() for n in names]
            for n in names:
                group.create_dataset(n + ":0", data=src[layer][n][()])

    for variant in (full, colon):
        got = xception.create_model("xception", pretrained=variant).state_dict()
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), (variant.name, k)

    native = tmp_path / "native.weights.h5"
    kmodel.save_weights(str(native))  # Keras 3's own format names layers by class: refused, with a hint
    with pytest.raises(ValueError, match="native.weights.h5.*Keras 3 native"):
        xception.create_model("xception", pretrained=native)
