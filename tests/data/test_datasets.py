"""Datasets, transforms, samplers and input expansion (no model involved)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from image_folders import make_image_folder
from xception.preprocessing import Preprocessing
from xception.data.datasets import DigitsDataset, SafeImageFolder
from xception.data.images import collate_skip, expand_inputs, warn_unreadable
from xception.data.sampling import EpochSampler, IndexedDataset
from xception.data.splits import open_split, training_splits


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1437, 360)
    assert DigitsDataset("val").targets == val.targets  # the same split every time
    counts_all = Counter(DigitsDataset("all").targets)
    for c, n in Counter(val.targets).items():
        assert abs(n - 0.2 * counts_all[c]) <= 1  # stratified
    img, label = train[0]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (8, 8) and 0 <= label <= 9
    train_pixels = {train.images[i].tobytes() for i in range(len(train))}
    overlap = sum(val.images[i].tobytes() in train_pixels for i in range(len(val)))
    assert overlap <= 3  # disjoint by index; at most a few exact-duplicate digits exist


def test_eval_transform_grayscale_to_rgb_in_minus_one_one():
    img = Image.fromarray((torch.arange(64).reshape(8, 8) * 4).to(torch.uint8).numpy(), mode="L")
    x = Preprocessing(image_size=32, crop_pct=1.0).eval_transform()(img)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.8
    # crop_pct 0.875: resize to 37, centre-crop 32 (the border is cut)
    assert Preprocessing(image_size=32).eval_transform()(img).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocessing(image_size=32, crop_pct=0.0)


def test_seeded_augmentation_is_per_sample_and_leaves_global_rng_alone():
    ds = IndexedDataset(DigitsDataset("train", Preprocessing(image_size=24).train_transform()))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _, idx = ds[(5, 42)]
    b, _, _ = ds[(5, 42)]
    c, _, _ = ds[(5, 43)]
    assert idx == 5 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


def test_epoch_sampler_shards_cover_once_and_resume_position():
    data = list(range(10))
    shards = [list(EpochSampler(data, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    seen = [i for shard in shards for i, _ in shard]
    assert sorted(seen) == data  # every index exactly once across ranks
    s = EpochSampler(data, seed=3)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(2)
    assert [i for i, _ in s] != [i for i, _ in full]  # reshuffled per epoch


def test_image_folder_skips_corrupt_files_by_path(tmp_path, caplog):
    root = make_image_folder(tmp_path, {"": {"a": 2, "b": 2}})
    bad = root / "a" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = IndexedDataset(SafeImageFolder(root, Preprocessing(image_size=16).eval_transform()))
    batch = collate_skip([ds[(i, None)] for i in range(len(ds))])
    with caplog.at_level(logging.WARNING):
        skipped = warn_unreadable(batch)
    assert skipped == 1 and batch.images.shape == (4, 3, 16, 16) and len(batch.targets) == 4
    assert [i for i, _ in batch.unreadable] == [ds.dataset.samples.index((str(bad), 0))]
    assert str(bad) in caplog.text


def test_bad_folders_fail_with_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        training_splits(tmp_path / "missing", Preprocessing(image_size=16))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        training_splits(tmp_path / "empty", Preprocessing(image_size=16))
    root = make_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=r"train/c has no images"):
        training_splits(root, Preprocessing(image_size=16))
    (root / "train" / "c").rmdir()
    (root / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        training_splits(root, Preprocessing(image_size=16))


def test_val_split_of_flat_class_folders(tmp_path):
    root = make_image_folder(tmp_path, {"": {"a": 5, "b": 5}})
    with pytest.raises(ValueError, match="--val-split"):
        training_splits(root, Preprocessing(image_size=16))
    splits = training_splits(root, Preprocessing(image_size=16), val_split=0.4)
    assert (len(splits.train), len(splits.val)) == (6, 4) and splits.classes == ["a", "b"]
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert sorted(splits.val.targets) == [0, 0, 1, 1]
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16)


def test_expand_inputs_files_folders_globs(tmp_path):
    root = make_image_folder(tmp_path, {"": {"a": 2, "b": 1}})
    (root / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert len(expand_inputs([str(root)])) == 3  # recursive, images only
    assert len(expand_inputs([str(root / "a" / "*.png")])) == 2
    assert expand_inputs([str(root / "b" / "b0.png")]) == [(root / "b" / "b0.png", None)]
    # each bad input is an entry with its reason, and the good ones around it are kept
    entries = expand_inputs([str(root / "nothing_here.png"), str(root / "b"), str(root / "*.jpg"),
                             str(tmp_path / "empty")])
    assert entries == [(root / "nothing_here.png", "no such file or folder"), (root / "b" / "b0.png", None),
                       (root / "*.jpg", "no files match this pattern"), (tmp_path / "empty", "no images in this folder")]


def test_open_split_serves_every_command_the_same_split(tmp_path):
    root = make_image_folder(tmp_path, {"": {"a": 5, "b": 5}})
    tf = Preprocessing(image_size=16).eval_transform()
    val = open_split(root, "val", tf, val_split=0.4)
    train = open_split(root, "train", tf, val_split=0.4)
    assert sorted(val.indices) == sorted(training_splits(root, Preprocessing(image_size=16), val_split=0.4).val.indices)
    assert set(train.indices).isdisjoint(val.indices) and len(train) + len(val) == 10
    assert len(open_split(root, "val", tf)) == 10  # no val_split: the whole folder (eval on a flat folder)
    assert open_split("digits", "val", tf).targets == DigitsDataset("val").targets
    with pytest.raises(ValueError, match="the model has"):
        open_split("digits", "val", tf, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="split must be"):
        open_split(root, "test", tf)
