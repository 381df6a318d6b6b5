"""The one image decoder: EXIF orientation, 16-bit images, the decompression-bomb limit, errors by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import xception
from xception.data.images import UnreadableImage, open_image, read_image
from xception.inference.classify import Classifier

ORIENTATION = 0x0112  # the EXIF tag a phone writes instead of turning the pixels


def _upright(w: int = 64, h: int = 48) -> Image.Image:
    """An image whose orientation shows: a gradient across, a bright block in one corner."""
    rng = np.random.default_rng(0)
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = rng.integers(0, 255, (h, w), dtype=np.uint8)
    a[: h // 3, : w // 4, 2] = 255
    return Image.fromarray(a)


def _phone_jpeg(path, upright: Image.Image) -> None:
    """As a phone held upright saves it: the sensor's pixels (turned 90 degrees) + orientation 6."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


def test_exif_orientation_6_is_read_upright(tmp_path):
    upright = _upright()
    _phone_jpeg(tmp_path / "phone.jpg", upright)
    upright.save(tmp_path / "upright.jpg", quality=95)
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert raw.size == (48, 64) and raw.getexif()[ORIENTATION] == 6  # stored sideways
    decoded = open_image(tmp_path / "phone.jpg")
    assert decoded.size == (64, 48) and decoded.mode == "RGB"
    diff = np.abs(np.asarray(decoded, np.int16) - np.asarray(open_image(tmp_path / "upright.jpg"), np.int16))
    assert diff.mean() < 4  # the same picture up to JPEG's rounding of the turned blocks


def test_phone_photo_is_classified_as_the_upright_image(tmp_path):
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=5, middle_blocks=0).eval()
    clf = Classifier(model, device="cpu", image_size=32, crop_pct=1.0)
    upright = _upright()
    _phone_jpeg(tmp_path / "phone.jpg", upright)
    upright.save(tmp_path / "upright.jpg", quality=95)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what reading without EXIF would give
    p_phone, p_upright, p_sideways = clf.probabilities([tmp_path / "phone.jpg", tmp_path / "upright.jpg", sideways])
    assert clf(tmp_path / "phone.jpg")[0].index == clf(tmp_path / "upright.jpg")[0].index
    close, far = (p_phone - p_upright).abs().max().item(), (p_phone - p_sideways).abs().max().item()
    assert close < far / 5, (close, far)


@pytest.mark.parametrize("dtype,top", [(np.uint16, 65535), (np.uint8, 255)])
def test_deep_and_gray_images_become_rgb_at_full_range(tmp_path, dtype, top):
    a = np.linspace(0, top, 16 * 8).reshape(8, 16).astype(dtype)
    Image.fromarray(a).save(tmp_path / "g.png")  # a 16-bit or an 8-bit grayscale PNG
    rgb = np.asarray(open_image(tmp_path / "g.png"))
    assert rgb.shape == (8, 16, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255  # not clipped to white
    assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)


def test_bad_images_are_named(tmp_path, monkeypatch):
    (tmp_path / "text.jpg").write_text("not an image")
    _upright().save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    for name in ("text.jpg", "cut.png"):
        with pytest.raises(UnreadableImage, match=rf"{name}: not a readable image"):
            open_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        read_image(tmp_path / "missing.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 4)  # past twice the limit: refused
    with pytest.raises(UnreadableImage, match="ok.png: refused, too many pixels"):
        open_image(tmp_path / "ok.png")
    with pytest.raises(UnreadableImage, match="upload: not a readable image"):
        open_image(b"GIF89a truncated", "upload")  # bytes (an upload, a shard member) are named as told
