"""Datasets, transforms, samplers and input expansion (no model involved)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from image_folders import make_image_folder
from xception.preprocessing import Preprocessing
from xception.training.data import (DigitsDataset, EpochSampler, IndexedDataset, SafeImageFolder, build_datasets,
                                    collate_skip, expand_inputs)


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
    with caplog.at_level(logging.WARNING):
        batch = [ds[(i, None)] for i in range(len(ds))]
    images, targets, indices, skipped = collate_skip(batch)
    assert skipped == 1 and images.shape == (4, 3, 16, 16) and len(targets) == 4
    assert str(bad) in caplog.text


def test_bad_folders_fail_with_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_datasets(tmp_path / "missing", Preprocessing(image_size=16))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_datasets(tmp_path / "empty", Preprocessing(image_size=16))
    root = make_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=r"train/c has no images"):
        build_datasets(root, Preprocessing(image_size=16))
    (root / "train" / "c").rmdir()
    (root / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        build_datasets(root, Preprocessing(image_size=16))


def test_val_split_of_flat_class_folders(tmp_path):
    root = make_image_folder(tmp_path, {"": {"a": 5, "b": 5}})
    with pytest.raises(ValueError, match="--val-split"):
        build_datasets(root, Preprocessing(image_size=16))
    splits = build_datasets(root, Preprocessing(image_size=16), val_split=0.4)
    assert (len(splits.train), len(splits.val)) == (6, 4) and splits.classes == ["a", "b"]
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert sorted(splits.val.targets) == [0, 0, 1, 1]
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16)


def test_expand_inputs_files_folders_globs(tmp_path):
    root = make_image_folder(tmp_path, {"": {"a": 2, "b": 1}})
    (root / "notes.txt").write_text("x")
    assert len(expand_inputs([str(root)])) == 3  # recursive, images only
    assert len(expand_inputs([str(root / "a" / "*.png")])) == 2
    assert expand_inputs([str(root / "b" / "b0.png")]) == [root / "b" / "b0.png"]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_inputs([str(root / "nothing_here.png")])
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_inputs([str(root / "*.jpg")])
