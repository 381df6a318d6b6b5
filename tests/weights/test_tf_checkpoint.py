"""Our TensorFlow checkpoint reader against checkpoints TensorFlow itself writes."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from lazy_import import LazyModule, skip_without

# xception imports torchvision, which loads triton (via torch._dynamo): it must come before
# TensorFlow (TF 2.21's libraries and triton both bundle LLVM; the other order segfaults).
import xception  # noqa: F401
from xception.weights import tf_checkpoint as tfc
from xception.weights.tf_checkpoint import (
    crc32c,
    read_tf_checkpoint,
    read_tf_checkpoint_index,
)

tf = LazyModule("tensorflow")  # imported by the first test that uses it
pytestmark = skip_without("tensorflow")

# name -> (numpy dtype to make it with, name of the TensorFlow dtype to save it as)
_DTYPES = {
    "float32": (np.float32, "float32"),
    "float64": (np.float64, "float64"),
    "float16": (np.float16, "float16"),
    "bfloat16": (np.float32, "bfloat16"),
    "int32": (np.int32, "int32"),
    "int64": (np.int64, "int64"),
    "int16": (np.int16, "int16"),
    "int8": (np.int8, "int8"),
    "uint8": (np.uint8, "uint8"),
    "uint16": (np.uint16, "uint16"),
    "bool": (np.bool_, "bool"),
    "complex64": (np.complex64, "complex64"),
}
_SHAPES = [(), (3,), (0,), (2, 5), (3, 3, 4, 1), (1, 1, 7, 6), (2, 0, 3)]


def _values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """1600+ variables: DeepLab-like names, many long unique names (several index blocks), every
    dtype and shape kind (scalar, empty), and one 16 MB tensor (the vectorised checksum)."""
    out: dict[str, np.ndarray] = {}
    for i in range(1500):
        kind = list(_DTYPES)[i % len(_DTYPES)]
        shape = _SHAPES[i % len(_SHAPES)]
        make = _DTYPES[kind][0]
        if kind == "bool":
            value = rng.random(shape) < 0.5
        elif np.issubdtype(make, np.complexfloating):
            value = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(make)
        elif np.issubdtype(make, np.integer):
            info = np.iinfo(make)
            value = rng.integers(info.min, info.max, shape, dtype=make, endpoint=True)
        else:
            value = rng.standard_normal(shape).astype(make)
        name = f"scope_{i % 37}/{i:05d}_{kind}/" + "layer/" * 30 + "weights"
        out[name] = value
    for flow, n in (("entry_flow", 3), ("middle_flow", 16)):
        for u in range(1, n + 1):
            for j in (1, 2, 3):
                base = f"xception_65/{flow}/block1/unit_{u}/xception_module/separable_conv{j}"
                out[f"{base}_depthwise/depthwise_weights"] = rng.standard_normal((3, 3, 8, 1)).astype(np.float32)
                for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
                    out[f"{base}_pointwise/BatchNorm/{leaf}"] = rng.standard_normal(8).astype(np.float32)
    out["global_step"] = np.array(123456789012, dtype=np.int64)
    out["big/tensor"] = rng.standard_normal((1024, 4096)).astype(np.float32)
    return out


def _save(prefix: Path, values: dict[str, np.ndarray]) -> None:
    names = list(values)
    tensors = []
    for name in names:
        kind = name.split("/")[1].split("_", 1)[1] if name.startswith("scope_") else None
        tensors.append(tf.constant(values[name], dtype=getattr(tf, _DTYPES[kind][1]) if kind else None))
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)


@pytest.fixture(scope="module")
def values() -> dict[str, np.ndarray]:
    return _values(np.random.default_rng(0))


@pytest.fixture(scope="module")
def ckpt(values, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    _save(prefix, values)
    return prefix


@pytest.fixture
def copy(ckpt, tmp_path) -> Path:
    """A private copy of the checkpoint to damage."""
    for f in ckpt.parent.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path / ckpt.name


def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    rng = np.random.default_rng(1)
    for n in (70_000, 1 << 20, 1_234_567):  # the vectorised path against the byte loop
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == tfc._crc_register_small(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_same_names_shapes_dtypes_values(ckpt, values):
    index = tfc._load_index(ckpt)
    assert index.data_blocks >= 2  # the test exercises block boundaries
    got = read_tf_checkpoint(ckpt)
    assert list(got) == sorted(values, key=lambda s: s.encode())
    reader = tf.train.load_checkpoint(str(ckpt))
    for name, want in values.items():
        tf_value = reader.get_tensor(name)
        value = got[name]
        kind = name.split("/")[1].split("_", 1)[1] if name.startswith("scope_") else None
        if kind == "bfloat16":  # widened exactly to float32
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, tf_value.astype(np.float32), err_msg=name)
        else:
            assert value.dtype == tf_value.dtype == want.dtype, name
            np.testing.assert_array_equal(value, tf_value, err_msg=name)
            np.testing.assert_array_equal(value, want, err_msg=name)
        assert value.shape == want.shape, name
        assert value.flags.writeable
    entries = read_tf_checkpoint_index(ckpt)
    assert entries["global_step"].dtype_name == "int64" and entries["global_step"].shape == ()
    assert entries["big/tensor"].shape == (1024, 4096)


def test_path_forms(ckpt, tmp_path):
    names = set(read_tf_checkpoint_index(ckpt))
    data = ckpt.with_name(ckpt.name + ".data-00000-of-00001")
    for form in (str(ckpt), ckpt.with_name(ckpt.name + ".index"), data, ckpt.parent):
        assert set(read_tf_checkpoint_index(form)) == names
    _save(tmp_path / "a", {"x": np.zeros(2, np.float32)})
    _save(tmp_path / "b", {"y": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="several checkpoints"):
        read_tf_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no \*\.index"):
        read_tf_checkpoint(tmp_path / "empty")


def test_tf_train_checkpoint_object_names(tmp_path, caplog):
    """tf.train.Checkpoint: object-graph names and a DT_STRING entry, which is skipped."""
    v = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    step = tf.Variable(7, dtype=tf.int64)
    path = tf.train.Checkpoint(model=tf.train.Checkpoint(kernel=v), step=step).write(str(tmp_path / "ck"))
    with caplog.at_level(logging.DEBUG, logger=tfc.__name__):
        got = read_tf_checkpoint(path)
    want = {n for n, _ in tf.train.list_variables(path)} - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert set(got) == want
    np.testing.assert_array_equal(got["model/kernel/.ATTRIBUTES/VARIABLE_VALUE"], v.numpy())
    assert got["step/.ATTRIBUTES/VARIABLE_VALUE"] == 7
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in caplog.text and "string" in caplog.text


def test_several_shards(tmp_path):
    _save(tmp_path / "part0", {"a/w": np.ones((2, 2), np.float32), "c": np.arange(3)})
    _save(tmp_path / "part1", {"b/w": np.full(4, 2.5, np.float64)})
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[str(tmp_path / "part0"), str(tmp_path / "part1")],
        destination_prefix=str(tmp_path / "merged"),
    )
    assert (tmp_path / "merged.data-00001-of-00002").is_file()
    got = read_tf_checkpoint(tmp_path / "merged")
    assert list(got) == ["a/w", "b/w", "c"]
    assert got["b/w"].dtype == np.float64 and got["b/w"][3] == 2.5
    (tmp_path / "merged.data-00001-of-00002").unlink()
    with pytest.raises(FileNotFoundError, match=r"merged\.data-00001-of-00002"):
        read_tf_checkpoint(tmp_path / "merged")


def test_partitioned_variable_refused(tmp_path):
    tf.raw_ops.SaveV2(
        prefix=str(tmp_path / "p"),
        tensor_names=["part/v", "part/v", "whole"],
        shape_and_slices=["4 2 0,2:-", "4 2 2,2:-", ""],
        tensors=[tf.zeros([2, 2]), tf.ones([2, 2]), tf.ones([1])],
    )
    with pytest.raises(ValueError, match=r"p\.index: variable 'part/v' is partitioned"):
        read_tf_checkpoint(tmp_path / "p")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_files(copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.ckpt.index") as e:
        read_tf_checkpoint(tmp_path / "no-such.ckpt")
    _one_line(e)
    data = copy.with_name(copy.name + ".data-00000-of-00001")
    data.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt\.data-00000-of-00001") as e:
        read_tf_checkpoint(copy)
    _one_line(e)


def test_truncated_data(copy):
    data = copy.with_name(copy.name + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"data-00000-of-00001: truncated: variable '") as e:
        read_tf_checkpoint(copy)
    _one_line(e)


def test_flipped_data_byte(copy):
    entry = read_tf_checkpoint_index(copy)["global_step"]
    data = copy.with_name(copy.name + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 3] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"data-00000-of-00001: checksum mismatch in variable 'global_step'") as e:
        read_tf_checkpoint(copy)
    _one_line(e)


def test_damaged_index(copy):
    index = copy.with_name(copy.name + ".index")
    good = index.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 3] ^= 0x01  # inside a data block
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.ckpt\.index: checksum mismatch in data block \d+") as e:
        read_tf_checkpoint(copy)
    _one_line(e)
    index.write_bytes(good[:-20])  # truncated: the footer's magic is gone
    with pytest.raises(ValueError, match=r"model\.ckpt\.index: bad magic number"):
        read_tf_checkpoint(copy)
    index.write_bytes(good[:30])
    with pytest.raises(ValueError, match=r"model\.ckpt\.index: too short"):
        read_tf_checkpoint(copy)


def test_snappy_block_refused(tmp_path):
    _save(tmp_path / "s", {"x": np.zeros(2, np.float32)})
    index = tmp_path / "s.index"
    raw = bytearray(index.read_bytes())
    footer = bytes(raw[-48:])
    _, pos = tfc._varint(footer, 0)
    _, pos = tfc._varint(footer, pos)
    off, pos = tfc._varint(footer, pos)
    size, _ = tfc._varint(footer, pos)
    raw[off + size] = 1  # the index block's type byte -> snappy, with a matching checksum
    crc = crc32c(bytes(raw[off : off + size + 1]))
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    raw[off + size + 1 : off + size + 5] = struct.pack("<I", masked)
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="snappy-compressed"):
        read_tf_checkpoint(tmp_path / "s")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.index").write_text("hello, this is not a checkpoint at all\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.index: bad magic number") as e:
        read_tf_checkpoint(tmp_path / "notes.index")
    _one_line(e)
    h5 = tmp_path / "weights.h5"
    h5.write_bytes(os.urandom(1000))
    with pytest.raises(FileNotFoundError, match=r"weights\.h5\.index"):
        read_tf_checkpoint(h5)
