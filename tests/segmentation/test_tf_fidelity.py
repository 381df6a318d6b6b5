"""Fidelity to TensorFlow DeepLab: a checkpoint TensorFlow writes, with DeepLab's variable names
and shapes for Xception-65 + ASPP + decoder + logits, loads without TensorFlow into our
DeepLabV3Plus (every variable mapped, none left over), and our output equals the same network
computed with TensorFlow ops (its SAME padding, its epsilons, its resizes) at output stride 16 and 8
on an input whose sides are not multiples of 16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lazy_import import LazyModule, skip_without
from segmentation import tf_deeplab

from xception.segmentation import DeepLabV3Plus, load_deeplab, read_deeplab_checkpoint

tf = LazyModule("tensorflow")  # imported by the first test that uses it (after torchvision: tf_deeplab)
pytestmark = skip_without("tensorflow")

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(prefix, variables)``: DeepLab's variables with random values, saved by TensorFlow."""
    variables = tf_deeplab.deeplab_variables(NUM_CLASSES, np.random.default_rng(0))
    variables["global_step"] = np.array(30000, dtype=np.int64)  # a real checkpoint holds it too
    prefix = str(tmp_path_factory.mktemp("ckpt") / "model.ckpt")
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])
    return prefix, variables


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_equals_tensorflow(checkpoint, output_stride, one_thread):
    prefix, variables = checkpoint
    model = load_deeplab(prefix)  # no backbone named: xception65, the classes from the logits
    assert model.num_classes == NUM_CLASSES and model.config.backbone == "xception65"
    model.set_output_stride(output_stride)  # loaded at 16, re-dilated with the same weights
    image = np.random.default_rng(1).uniform(-1.0, 1.0, (1, 41, 53, 3)).astype(np.float32)
    with torch.no_grad():
        ours = model.eval()(torch.from_numpy(image).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ref = tf_deeplab.deeplab_forward_tf(variables, image, output_stride)
    assert ours.shape == ref.shape == (1, 41, 53, NUM_CLASSES)
    assert ref.std() > 0.1  # a network whose output means something, not a constant
    assert rel_error(ours, ref) <= 1e-4, rel_error(ours, ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_a_checkpoint_that_does_not_fit_names_every_variable(checkpoint, tmp_path):
    """(That every variable maps, and nothing is left over, the loads above show: load_deeplab
    reads with the same check and loads the state dict strictly.)"""
    _, variables = checkpoint
    model = DeepLabV3Plus(backbone="xception65", num_classes=NUM_CLASSES, head_depthwise_bn=True)
    # A variable of another shape, an extra one and a missing one: each named in the one error.
    broken = dict(variables)
    broken["aspp0/weights"] = np.zeros((1, 1, 2048, 128), np.float32)
    broken["decoder/extra_conv/weights"] = np.zeros((1, 1, 4, 4), np.float32)
    del broken["logits/semantic/biases"]
    prefix2 = str(tmp_path / "broken.ckpt")
    names = sorted(broken)
    tf.raw_ops.SaveV2(prefix=prefix2, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(broken[n]) for n in names])
    with pytest.raises(ValueError) as err:
        read_deeplab_checkpoint(prefix2, model)
    message = str(err.value)
    assert "broken.ckpt" in message and "\n" not in message
    for name in ("aspp0/weights", "decoder/extra_conv/weights", "logits/semantic/biases"):
        assert name in message
