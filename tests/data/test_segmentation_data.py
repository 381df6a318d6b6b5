"""Segmentation data: both layouts, the checks by file name, EXIF, palettes, and the joint augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from xception.data.images import UnreadableImage
from xception.data.sampling import IndexedDataset, sample_seed
from xception.data.segmentation import (VOC_CLASSES, SegmentationDataset, SegmentationEvalTransform,
                                        SegmentationTrainTransform, pad_collate, save_mask_png, voc_palette)
from xception.preprocessing import Preprocessing

IGNORE = 255
H, W = 20, 30
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)  # class -> colour
BORDER = np.array([0, 0, 0], np.uint8)  # the colour of ignored blocks
ORIENTATION = 0x0112


def _blocks(h: int = H, w: int = W, block: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured blocks and its mask: each block's class decides its colour (255: black)."""
    rng = np.random.default_rng(seed)
    grid = rng.choice([0, 1, 2, 3, IGNORE], size=(-(-h // block), -(-w // block)), p=[0.22, 0.22, 0.22, 0.22, 0.12])
    grid.flat[:5] = [0, 1, 2, 3, IGNORE]  # every value present
    mask = np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    image = np.where((mask == IGNORE)[..., None], BORDER, COLOURS[np.minimum(mask, 3)])
    return image, mask


def _classes_of(image: torch.Tensor, mean=0.5, std=0.5) -> torch.Tensor:
    """The class whose colour each pixel of a normalised (3, H, W) image is nearest to."""
    rgb = (image * std + mean).permute(1, 2, 0) * 255.0  # (H, W, 3)
    distance = ((rgb[:, :, None, :] - torch.tensor(COLOURS, dtype=torch.float32)) ** 2).sum(-1)  # (H, W, 4)
    return distance.argmin(-1)


def _voc_tree(base, stems=("2007_000032", "2007_000039", "2007_000063")) -> dict[str, np.ndarray]:
    voc = base / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    masks = {}
    for i, stem in enumerate(stems):
        image, mask = _blocks(seed=i)
        mask[mask == 3] = 20  # tvmonitor: a value a palette->RGB->index round trip would not keep
        Image.fromarray(image).save(voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        save_mask_png(mask, voc / "SegmentationClass" / f"{stem}.png")
        masks[stem] = mask
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(stems[:2]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text(stems[2] + "\n")
    return masks


def _plain_tree(root, split: str = "train", suffixes=(".png", ".jpg", ".bmp")) -> dict[str, np.ndarray]:
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir()
    masks = {}
    for i, suffix in enumerate(suffixes):
        image, mask = _blocks(seed=10 + i)
        Image.fromarray(image).save(root / split / "images" / f"img{i}{suffix}")
        if i % 2:  # "P" with a palette and "L" alike
            save_mask_png(mask, root / split / "masks" / f"img{i}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"img{i}.png")
        masks[f"img{i}"] = mask
    return masks


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_layout_keeps_mask_values_exactly(tmp_path, where):
    masks = _voc_tree(tmp_path)
    ds = SegmentationDataset(tmp_path / where, "train")
    assert ds.layout == "voc" and len(ds) == 2 and ds.num_classes == 21
    assert ds.class_names == list(VOC_CLASSES) and len(ds.class_names) == 21
    assert (ds.class_names[0], ds.class_names[15], ds.class_names[20]) == ("background", "person", "tvmonitor")
    for index, stem in enumerate(["2007_000032", "2007_000039"]):
        image, mask = ds[index]
        assert image.shape == (3, H, W) and image.dtype == torch.uint8
        assert mask.shape == (H, W) and mask.dtype == torch.int64
        assert np.array_equal(mask.numpy(), masks[stem])  # 255 and 20 as stored, no palette colours
        assert set(mask.unique().tolist()) == {0, 1, 2, 20, IGNORE}
        assert (_classes_of(image.float() / 127.5 - 1.0)[mask < 3] == mask[mask < 3]).float().mean() > 0.95
    assert len(SegmentationDataset(tmp_path, "val", layout="voc")) == 1


def test_plain_layout_any_image_format_and_class_names(tmp_path):
    masks = _plain_tree(tmp_path)
    ds = SegmentationDataset(tmp_path, "train")
    assert ds.layout == "plain" and len(ds) == 3
    assert ds.class_names is None and ds.num_classes is None
    for index in range(3):
        image, mask = ds[index]
        assert image.shape == (3, H, W) and image.dtype == torch.uint8 and mask.dtype == torch.int64
        assert np.array_equal(mask.numpy(), masks[f"img{index}"])
    (tmp_path / "classes.txt").write_text("road\ncar\nsky\ntree\n\n")
    ds = SegmentationDataset(tmp_path, "train", layout="plain")
    assert ds.class_names == ["road", "car", "sky", "tree"] and ds.num_classes == 4
    with pytest.raises(ValueError, match="num_classes is 5 but the dataset names 4 classes"):
        SegmentationDataset(tmp_path, "train", num_classes=5)


def test_a_torchvision_v2_transform_moves_image_and_mask_together(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png",))
    image, mask = SegmentationDataset(tmp_path, "train")[0]
    flipped = SegmentationDataset(tmp_path, "train", transform=v2.RandomHorizontalFlip(p=1.0))[0]
    assert torch.equal(flipped[0], image.flip(-1)) and torch.equal(flipped[1], mask.flip(-1))


def test_layout_detection_and_its_errors(tmp_path):
    _voc_tree(tmp_path / "voc")
    _plain_tree(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no JPEGImages/ and SegmentationClass/"):
        SegmentationDataset(tmp_path / "plain", "train", layout="voc")
    with pytest.raises(FileNotFoundError, match="voc/train/images: no such folder"):
        SegmentationDataset(tmp_path / "voc", "train", layout="plain")
    with pytest.raises(ValueError, match="neither a VOC tree"):
        SegmentationDataset(tmp_path / "plain", "test")
    with pytest.raises(ValueError, match="layout must be one of auto, voc, plain, got 'coco'"):
        SegmentationDataset(tmp_path / "plain", "train", layout="coco")
    with pytest.raises(FileNotFoundError, match="trainaug.txt: no such split file"):
        SegmentationDataset(tmp_path / "voc", "trainaug")


# --- the checks, each naming its file ---------------------------------------------------------------


def test_missing_masks_are_listed_at_construction(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png", ".png", ".png", ".png", ".png"))
    for i in range(4):
        (tmp_path / "train/masks" / f"img{i}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks: no mask for 4 of 5 images \(img0.png, img1.png, img2.png, "
                                                r"\.\.\.\)"):
        SegmentationDataset(tmp_path, "train")
    masks = _voc_tree(tmp_path / "voc")
    (tmp_path / "voc/VOCdevkit/VOC2012/SegmentationClass" / f"{next(iter(masks))}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"SegmentationClass: no mask for 1 of 2 images \(2007_000032.png\)"):
        SegmentationDataset(tmp_path / "voc", "train")


def test_mask_of_another_size_names_both_files(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png",))
    mask_path, image_path = tmp_path / "train/masks/img0.png", tmp_path / "train/images/img0.png"
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(mask_path)
    ds = SegmentationDataset(tmp_path, "train")  # sizes are checked when a sample is read
    with pytest.raises(ValueError) as caught:
        ds[0]
    assert str(caught.value) == f"{mask_path}: mask is {W + 1}x{H} but image {image_path} is {W}x{H}"


def test_class_index_beyond_num_classes_names_the_mask(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png",))
    _, mask = _blocks()
    mask[0, 0], mask[1, 1] = 7, 9
    Image.fromarray(mask).save(tmp_path / "train/masks/img0.png")
    with pytest.raises(ValueError, match=r"train/masks/img0.png: class index 7, 9 is not below num_classes=4 nor "
                                         r"the ignore index 255"):
        SegmentationDataset(tmp_path, "train", num_classes=4)[0]
    assert SegmentationDataset(tmp_path, "train", num_classes=10)[0][1].max() == IGNORE  # 255 is never a class
    SegmentationDataset(tmp_path, "train")[0]  # no num_classes, nothing to check against


def test_unreadable_files_are_named(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png", ".png"))
    (tmp_path / "train/images/img0.png").write_bytes(b"not a png")
    (tmp_path / "train/masks/img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = SegmentationDataset(tmp_path, "train")
    with pytest.raises(UnreadableImage, match=r"train/images/img0.png: not a readable image"):
        ds[0]
    with pytest.raises(UnreadableImage, match=r"train/masks/img1.png: not a readable mask"):
        ds[1]


def test_colour_masks_are_refused(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png",))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "train/masks/img0.png")
    with pytest.raises(ValueError, match=r"img0.png: mask mode is RGB, expected one class index per pixel"):
        SegmentationDataset(tmp_path, "train")[0]


def test_split_files_naming_missing_images_and_empty_splits(tmp_path):
    _voc_tree(tmp_path)
    segmentation = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (segmentation / "train.txt").write_text("2007_000032\n\n2009_999999\n")
    with pytest.raises(FileNotFoundError, match=r"train.txt:3: names '2009_999999' but .*JPEGImages/2009_999999.jpg "
                                                r"does not exist"):
        SegmentationDataset(tmp_path, "train")
    (segmentation / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"val.txt: no samples \(an empty split\)"):
        SegmentationDataset(tmp_path, "val")
    (tmp_path / "plain/val/images").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"plain/val/images: no samples \(an empty split\)"):
        SegmentationDataset(tmp_path / "plain", "val")


def _phone_jpeg(path, upright: np.ndarray) -> None:
    """As a phone held upright saves it: the sensor's pixels (turned 90 degrees) + EXIF orientation 6."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


def test_exif_orientation_turns_image_and_mask_together(tmp_path):
    image, mask = _blocks(block=10)
    _plain_tree(tmp_path, suffixes=(".jpg",))
    _phone_jpeg(tmp_path / "train/images/img0.jpg", image)
    stored_mask = Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90)  # drawn on the stored pixels
    save_mask_png(np.asarray(stored_mask), tmp_path / "train/masks/img0.png")
    loaded_image, loaded_mask = SegmentationDataset(tmp_path, "train")[0]
    assert loaded_image.shape == (3, H, W)  # upright, as open_image reads it
    assert np.array_equal(loaded_mask.numpy(), mask)  # turned with it
    known = loaded_mask < 4
    assert (_classes_of(loaded_image.float() / 127.5 - 1.0)[known] == loaded_mask[known]).float().mean() > 0.95

    save_mask_png(mask, tmp_path / "train/masks/img0.png")  # drawn on the upright view instead
    with pytest.raises(ValueError, match=rf"img0.png: mask is {W}x{H} but image .*img0.jpg is {H}x{W} \(its size "
                                         rf"once turned upright by its EXIF orientation"):
        SegmentationDataset(tmp_path, "train")[0]


# --- palettes -------------------------------------------------------------------------------------


def test_voc_palette_and_palette_png_round_trip(tmp_path):
    palette = voc_palette()
    assert len(palette) == 768
    colours = {i: tuple(palette[3 * i: 3 * i + 3]) for i in (0, 1, 2, 3, 15, 20, 255)}
    assert colours == {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
                       20: (0, 64, 128), 255: (224, 224, 192)}
    mask = torch.tensor([[0, 1, 20], [255, 15, 3]])
    save_mask_png(mask, tmp_path / "m.png")
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary left behind
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.getpalette()[:768] == palette
        assert np.array_equal(np.asarray(img), mask.numpy())
    with pytest.raises(ValueError, match=r"class indices 0..255, got 0..300"):
        save_mask_png(np.array([[0, 300]]), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --- transforms and collate ---------------------------------------------------------------------------


def test_train_transform_crops_exactly_and_pads_with_mean_and_ignore():
    image, mask = _blocks()
    mask[mask == IGNORE] = 0  # so every 255 in the output is padding
    transform = SegmentationTrainTransform(64, (0.5, 2.0))
    for seed in range(8):
        x, y = transform(Image.fromarray(image), torch.from_numpy(mask).long(), torch.Generator().manual_seed(seed))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert y.shape == (64, 64) and y.dtype == torch.int64 and type(y) is torch.Tensor
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, IGNORE}  # nearest: no value invented
        assert (y == IGNORE).any()  # 20x30 at most doubled still needs padding to 64
        assert torch.equal(x[:, y == IGNORE], torch.zeros(3, int((y == IGNORE).sum())))  # the mean colour
    rect = SegmentationTrainTransform((16, 24), (1.0, 1.0), flip=False)
    x, y = rect(torch.from_numpy(image).permute(2, 0, 1), mask)
    assert x.shape == (3, 16, 24) and y.shape == (16, 24)


def test_train_transform_keeps_image_and_mask_aligned():
    image, mask = _blocks(60, 90, block=15, seed=3)
    transform = SegmentationTrainTransform(48, (0.5, 2.0))
    agreements = []
    for seed in range(12):
        x, y = transform(Image.fromarray(image), mask, torch.Generator().manual_seed(seed))
        known = y != IGNORE
        agreements.append((_classes_of(x)[known] == y[known]).float().mean().item())
        if seed == 0:  # the check would see a misaligned pair
            shifted = y.flip(-1)
            known = shifted != IGNORE
            assert (_classes_of(x)[known] == shifted[known]).float().mean() < 0.8
    # Only pixels the bilinear resize blends at block borders may disagree: ~1% here. A mask resized
    # with torch's plain "nearest" (up to a source pixel off its image) agrees on ~97%.
    assert min(agreements) > 0.95 and sum(agreements) / len(agreements) > 0.985, agreements


def test_train_transform_same_seed_same_sample_and_flips_half_the_time():
    image, mask = _blocks()
    transform = SegmentationTrainTransform(32)
    a = transform(torch.from_numpy(image).permute(2, 0, 1), mask, torch.Generator().manual_seed(5))  # tensor in
    b = transform(Image.fromarray(image), mask, torch.Generator().manual_seed(5))
    c = transform(Image.fromarray(image), mask, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a uint8 tensor and a PIL image alike
    assert not torch.equal(a[0], c[0])

    flip_only = SegmentationTrainTransform((H, W), (1.0, 1.0))  # no scale, no crop offset: only the flip
    plain = SegmentationEvalTransform()(Image.fromarray(image), mask)
    g = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(400):
        x, y = flip_only(Image.fromarray(image), mask, g)
        flipped = torch.equal(x, plain[0].flip(-1))
        assert flipped or torch.equal(x, plain[0])
        assert torch.equal(y, plain[1].flip(-1) if flipped else plain[1])
        flips += flipped
    assert 160 < flips < 240, flips  # 200 +- 4 sigma


def test_the_epoch_sampler_seed_decides_the_augmentation(tmp_path):
    """Through IndexedDataset, as training reads: (index, sample_seed) -> the same crop, scale and flip."""
    _plain_tree(tmp_path)
    ds = IndexedDataset(SegmentationDataset(tmp_path, "train", transform=SegmentationTrainTransform(24)))
    state = torch.get_rng_state()
    first = ds[(1, sample_seed(0, 3, 1))]
    again = ds[(1, sample_seed(0, 3, 1))]
    other_epoch = ds[(1, sample_seed(0, 4, 1))]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    assert first[2] == 1 and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other_epoch[0])


def test_eval_transform_and_pad_collate(tmp_path):
    _plain_tree(tmp_path, suffixes=(".png",))
    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x, y = SegmentationDataset(tmp_path, "train", transform=SegmentationEvalTransform(pre))[0]
    assert x.shape == (3, H, W) and x.dtype == torch.float32 and y.shape == (H, W) and y.dtype == torch.int64
    red = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    torch.testing.assert_close(x[:, y == 0].mean(1), red)  # normalised by the given mean and std
    with pytest.raises(ValueError, match="preprocessing or mean/std, not both"):
        SegmentationEvalTransform(pre, mean=(0.5, 0.5, 0.5))

    small, large = (torch.ones(3, 4, 5), torch.ones(4, 5, dtype=torch.long)), (torch.ones(3, 6, 3), torch.zeros(6, 3))
    images, masks = pad_collate([small, large])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5) and masks.dtype == torch.int64
    assert images[0, :, 4:].eq(0).all() and masks[0, 4:].eq(IGNORE).all() and masks[1, :, 3:].eq(IGNORE).all()
    assert images[0, :, :4].eq(1).all() and masks[0, :4].eq(1).all() and masks[1, :, :3].eq(0).all()
    images, masks, indices = pad_collate([(*small, 7), (*large, 2)], ignore_index=0, size_divisor=4)
    assert images.shape == (2, 3, 8, 8) and indices.tolist() == [7, 2] and masks[0, 4:].eq(0).all()
