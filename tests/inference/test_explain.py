"""``xception explain`` and the class-activation maps behind it: the PNGs it writes, the layers it
takes, and a model trained here whose Grad-CAM peak falls on the evidence."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import xception
from weight_files import randomize
from xception.cli import main
from xception.inference.explain import FeatureMapModel, class_activation_maps


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    model = randomize(xception.create_model("xception", num_classes=3, middle_blocks=0))
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    return xception.save_safetensors(model, path, ["cat", "dog", "fox"],
                                     preprocessing=xception.Preprocessing(image_size=32))


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "more/b.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((40, 36)).save(tmp_path / name)
    return tmp_path


def test_explain_writes_one_png_per_image(small_weights, photos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["explain", "--weights", str(small_weights), str(photos / "a.png"), str(photos / "more"),
               str(photos / "missing.png"), "--topk", "2", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1  # the missing one
    assert captured.err.strip() == f"xception explain: error: {photos / 'missing.png'}: no such file or folder"
    assert sorted(p.name for p in out.iterdir()) == ["a_explain.png", "b_explain.png"]
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{photos / 'a.png'}: {out / 'a_explain.png'} (")
    # 2 classes x (image + Grad-CAM heatmap, overlay + Grad-CAM++ heatmap, overlay), 100 dpi
    assert Image.open(out / "a_explain.png").size == (1300, 600)

    rc = main(["explain", "--weights", str(small_weights), str(photos / "a.png"), str(photos / "a.png"),
               "--class", "fox", "--methods", "gradcam,layercam,eigencam", "--layer", "block2", "--out", str(out),
               "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and [line.split(" (")[1] for line in lines] == [lines[0].split(" (")[1]] * 2
    assert "fox" in lines[0] and (out / "a_explain_2.png").is_file()  # the same name twice: a second file
    assert Image.open(out / "a_explain_2.png").size == (1820, 320)  # 1 class, 3 methods

    rc = main(["explain", "--weights", str(small_weights), str(photos / "a.png"), "--layer", "relu",
               "--out", str(out)])
    assert rc == 2 and "runs 4 times per forward pass" in capsys.readouterr().err


def test_maps_default_to_the_last_feature_map_and_any_layer_can_be_named():
    torch.manual_seed(0)
    model = randomize(xception.create_model("xception", num_classes=4, middle_blocks=0))
    x = torch.randn(1, 3, 64, 64)
    inplace = [m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert any(inplace)
    wrapped = FeatureMapModel(model)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))  # the wrapper changes nothing but where the map can be hooked
    default = class_activation_maps(model, x, [0, 3], methods=["gradcam"])["gradcam"]
    named = class_activation_maps(model, x, [0, 3], methods=["gradcam"], layer="block2")["gradcam"]
    assert default.shape == named.shape == (2, 64, 64)
    assert not np.allclose(default, named) and not np.allclose(default[0], default[1])
    assert [m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU)] == inplace  # restored
    assert all(p.grad is None for p in model.parameters())

    # Grad-CAM by hand at the last feature map: ReLU(sum_k mean(dy/dA_k) A_k), upsampled, scaled to [0, 1].
    features = model.forward_features(x).detach().requires_grad_()
    model.forward_head(features)[0, 3].backward()
    cam = F.relu((features.grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    np.testing.assert_allclose(default[1], cam.numpy(), atol=1e-4)


# ---- the heatmap points at the evidence ------------------------------------------------------------

SIZE = 64


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(n, 3, 64, 64) inputs in [-1, 1]: grey noise, a 10-px square of the class's colour (red, green,
    blue) in one quadrant and a black square (a distractor) in another. Returns inputs, classes, quadrants
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.25, (n, 3, SIZE, SIZE)).astype(np.float32)
    y, quadrant = rng.integers(0, 3, n), rng.integers(0, 4, n)
    half, side = SIZE // 2, 10

    def square(i: int, q: int) -> tuple[slice, slice]:
        r = (q // 2) * half + rng.integers(2, half - side - 2)
        c = (q % 2) * half + rng.integers(2, half - side - 2)
        return slice(r, r + side), slice(c, c + side)

    for i in range(n):
        rows, cols = square(i, quadrant[i])
        x[i, :, rows, cols] = -0.8
        x[i, y[i], rows, cols] = 0.9
        rows, cols = square(i, (quadrant[i] + rng.integers(1, 4)) % 4)
        x[i, :, rows, cols] = -0.9
    return torch.from_numpy(x), torch.from_numpy(y), quadrant


@pytest.mark.slow
def test_grad_cam_peak_falls_in_the_quadrant_with_the_evidence(record_property):
    """Train a small model here (16 steps); on 40 held-out images the Grad-CAM peak of the true class
    must fall in the quadrant holding the class's square for most images."""
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=3, middle_blocks=0, output_stride=16)  # 4x4 map at 64 px
    x, y, _ = quadrant_images(512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(16):
        idx = torch.randint(0, len(x), (16,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for m in model.modules():  # batch-norm statistics of the trained weights (16 steps are too few for the EMA)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, 128, 32):
            model(x[i:i + 32])
    model.eval()

    held_x, held_y, held_q = quadrant_images(40, seed=1)
    with torch.no_grad():
        accuracy = (model(held_x).argmax(dim=1) == held_y).float().mean().item()
    maps = class_activation_maps(model, held_x, held_y.tolist(), methods=["gradcam", "gradcam++"])
    rates = {}
    for method, heat in maps.items():
        peaks = [np.unravel_index(h.argmax(), h.shape) for h in heat]
        found = np.array([(r >= SIZE // 2) * 2 + (c >= SIZE // 2) for r, c in peaks])
        rates[method] = float(np.mean(found == held_q))
    record_property("accuracy", accuracy)
    record_property("quadrant_rates", rates)
    print(f"held-out accuracy {accuracy:.3f}; peak in the evidence quadrant: {rates}")
    assert accuracy >= 0.8
    assert rates["gradcam"] >= 0.75 and rates["gradcam++"] >= 0.6  # chance: 0.25
