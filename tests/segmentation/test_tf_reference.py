"""Smoke test of the TensorFlow DeepLabv3+ Xception-65 reference (tf_deeplab.py)."""

from __future__ import annotations

import numpy as np
import pytest
from lazy_import import LazyModule, skip_without
from segmentation import tf_deeplab as D

tf = LazyModule("tensorflow")  # imported by the first test that uses it (after torchvision: tf_deeplab)
pytestmark = skip_without("tensorflow")

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def variables() -> dict[str, np.ndarray]:
    return D.deeplab_variables(NUM_CLASSES, np.random.default_rng(0))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1.0, 1.0, (1, 67, 83, 3)).astype(np.float32)


def test_variable_names_and_shapes(variables):
    shapes = D.deeplab_variable_shapes(NUM_CLASSES)
    assert len(shapes) == 732
    assert {k: v.shape for k, v in variables.items()} == shapes
    assert all(v.dtype == np.float32 for v in variables.values())
    x = "xception_65"
    unit = f"{x}/entry_flow/block1/unit_1/xception_module"
    expected = {
        f"{x}/entry_flow/conv1_1/weights": (3, 3, 3, 32),
        f"{x}/entry_flow/conv1_1/BatchNorm/gamma": (32,),
        f"{x}/entry_flow/conv1_2/weights": (3, 3, 32, 64),
        f"{unit}/separable_conv1_depthwise/depthwise_weights": (3, 3, 64, 1),
        f"{unit}/separable_conv1_depthwise/BatchNorm/moving_variance": (64,),
        f"{unit}/separable_conv1_pointwise/weights": (1, 1, 64, 128),
        f"{unit}/shortcut/weights": (1, 1, 64, 128),
        f"{unit}/shortcut/BatchNorm/beta": (128,),
        f"{x}/middle_flow/block1/unit_16/xception_module/separable_conv3_pointwise/weights": (1, 1, 728, 728),
        f"{x}/exit_flow/block1/unit_1/xception_module/separable_conv2_pointwise/weights": (1, 1, 728, 1024),
        f"{x}/exit_flow/block1/unit_1/xception_module/shortcut/weights": (1, 1, 728, 1024),
        f"{x}/exit_flow/block2/unit_1/xception_module/separable_conv1_depthwise/depthwise_weights": (3, 3, 1024, 1),
        f"{x}/exit_flow/block2/unit_1/xception_module/separable_conv3_pointwise/weights": (1, 1, 1536, 2048),
        "image_pooling/weights": (1, 1, 2048, 256),
        "aspp0/weights": (1, 1, 2048, 256),
        "aspp3_depthwise/depthwise_weights": (3, 3, 2048, 1),
        "aspp3_pointwise/weights": (1, 1, 2048, 256),
        "concat_projection/weights": (1, 1, 1280, 256),
        "decoder/feature_projection0/weights": (1, 1, 256, 48),
        "decoder/decoder_conv0_depthwise/depthwise_weights": (3, 3, 304, 1),
        "decoder/decoder_conv0_pointwise/weights": (1, 1, 304, 256),
        "decoder/decoder_conv1_pointwise/BatchNorm/moving_mean": (256,),
        "logits/semantic/weights": (1, 1, 256, NUM_CLASSES),
        "logits/semantic/biases": (NUM_CLASSES,),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert not any(k.endswith("/shortcut/weights") for k in shapes if "middle_flow" in k or "exit_flow/block2" in k)
    assert [k for k in shapes if k.endswith("biases")] == ["logits/semantic/biases"]
    assert sum(k.endswith("/BatchNorm/gamma") for k in shapes) == sum(k.endswith("weights") for k in shapes) - 1


def test_unit_schedule():
    os16 = D.unit_schedule(16)
    os8 = D.unit_schedule(8)
    assert len(os16) == len(os8) == 21
    assert os16[:3] == os8[:2] + [("entry_flow/block3/unit_1", 2, 1)]
    assert os8[2] == ("entry_flow/block3/unit_1", 1, 1)
    assert os16[3:19] == [(f"middle_flow/block1/unit_{u}", 1, 1) for u in range(1, 17)]
    assert os8[3:19] == [(f"middle_flow/block1/unit_{u}", 1, 2) for u in range(1, 17)]
    assert os16[19:] == [("exit_flow/block1/unit_1", 1, 1), ("exit_flow/block2/unit_1", 1, 2)]
    assert os8[19:] == [("exit_flow/block1/unit_1", 1, 2), ("exit_flow/block2/unit_1", 1, 4)]


@pytest.mark.parametrize(
    ("n_in", "n_out"), [((5, 6), (17, 21)), ((1, 1), (5, 6)), ((17, 21), (67, 83)), ((4, 4), (4, 4))]
)
def test_float64_resize_is_tf_align_corners(n_in, n_out):
    x = np.random.default_rng(2).standard_normal((2, *n_in, 3)).astype(np.float32)
    want = tf.compat.v1.image.resize_bilinear(x, n_out, align_corners=True).numpy()
    got = D._Net({}, np.float64).resize(tf.constant(x, tf.float64), n_out).numpy()
    # TF's float32 kernel rounds the scale (in - 1) / (out - 1) to float32: ~1e-7 per source pixel
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# The reference's forward pass (shape, a meaningful output) and its checkpoint written by TensorFlow
# and read back are exercised by test_tf_fidelity.py, which compares our network with it.
