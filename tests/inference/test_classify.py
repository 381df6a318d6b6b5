"""Classifying photos with the weights people have: ImageNet names, ``--weights`` for every command,
the Python API, and every bad input named while the rest is still classified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xception
from weight_files import randomize, serve_folder, write_keras_h5
from xception import weights as W
from xception.cli import build_parser, main
from xception.data.images import expand_inputs
from xception.inference.classify import class_index, decode_predictions
from xception.weights.sources import KERAS_PREPROCESSING

KERAS_FILE = "xception_weights_tf_dim_ordering_tf_kernels.h5"


def save_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A random photo-like RGB image (smooth colour blobs, not noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def keras_model() -> torch.nn.Module:
    """The default model with Keras's options (as a Keras file implies) and random weights: 1000 classes."""
    return randomize(xception.create_model("xception", bn_eps=1e-3, pool_padding="same"))


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    model = randomize(xception.create_model("xception", num_classes=3, middle_blocks=0))
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    return xception.save_safetensors(model, path, ["cat", "dog", "fox"],
                                     preprocessing=xception.Preprocessing(image_size=32))


# ---- ImageNet names ------------------------------------------------------------------------------


def test_imagenet_names_and_decode_predictions():
    names = xception.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000  # the two "crane"s are told apart
    assert (names[0], names[207], names[281], names[999]) == ("tench", "golden retriever", "tabby", "toilet tissue")
    names[0] = "changed"
    assert xception.imagenet_classes()[0] == "tench"  # a fresh list each time

    probs = torch.zeros(2, 1000)
    probs[0, [207, 3, 9]] = torch.tensor([0.7, 0.2, 0.1])
    probs[1, [1, 2]] = torch.tensor([0.4, 0.6])
    top = decode_predictions(probs, top=2)
    assert [(p.label, p.index) for p in top[0]] == [("golden retriever", 207), ("tiger shark", 3)]
    assert [p.label for p in top[1]] == ["great white shark", "goldfish"]
    assert top[0][0].prob == pytest.approx(0.7)
    assert decode_predictions(probs.numpy()[:1], top=1)[0][0].label == "golden retriever"  # numpy, as Keras
    with pytest.raises(ValueError, match="pass class_names"):
        decode_predictions(torch.rand(1, 10))
    assert decode_predictions(torch.tensor([[0.1, 0.9]]), top=5, class_names=["a", "b"])[0][0].label == "b"


def test_class_index_by_name_or_number():
    names = ["golden retriever", "tabby", "crane bird"]
    assert class_index("Golden Retriever", names) == 0 and class_index(2, names) == 2 and class_index("1", names) == 1
    with pytest.raises(ValueError, match="did you mean 'tabby'"):
        class_index("taby", names)
    with pytest.raises(ValueError, match="3 classes$"):
        class_index("zebra", names)
    with pytest.raises(ValueError, match="out of range"):
        class_index(7, names)


def test_1000_class_files_get_imagenet_names(keras_model, tmp_path):
    """Keras with top and timm-layout files record no names: ImageNet's are attached; other class
    counts and files that record their own names keep theirs."""
    h5 = write_keras_h5(keras_model, tmp_path / "k.h5")
    assert xception.create_model(pretrained=h5).class_names == xception.imagenet_classes()
    torch.save(keras_model.state_dict(), tmp_path / "timm.pth")
    assert xception.create_model(pretrained=tmp_path / "timm.pth").class_names[207] == "golden retriever"
    assert xception.create_model(pretrained=tmp_path / "timm.pth", num_classes=10).class_names is None
    small = xception.create_model("xception", num_classes=10, middle_blocks=0)
    torch.save(small.state_dict(), tmp_path / "ten.pth")
    assert xception.create_model(pretrained=tmp_path / "ten.pth", middle_blocks=0).class_names is None


# ---- Keras weights served over HTTP, through --weights ---------------------------------------------


def _top5(out: str) -> list[list[tuple[str, float]]]:
    return [[(t["class"], t["prob"]) for t in json.loads(line)["top"]] for line in out.splitlines()]


@pytest.mark.slow
def test_keras_weights_predict_imagenet_names_and_the_converted_file_agrees(keras_model, tmp_path, monkeypatch,
                                                                              capsys):
    served = tmp_path / "served"
    served.mkdir()
    write_keras_h5(keras_model, served / KERAS_FILE)
    md5 = hashlib.md5((served / KERAS_FILE).read_bytes()).hexdigest()
    photos = [str(save_photo(tmp_path / "photos" / f"p{i}.jpg", (160 + 40 * i, 120), seed=i)) for i in range(2)]
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    args = [*photos, "--json", "--topk", "5", "--workers", "0", "--device", "cpu"]
    with serve_folder(served) as (base, hits):
        monkeypatch.setitem(W.REMOTE_WEIGHTS, "keras", W.RemoteWeights(f"{base}/{KERAS_FILE}", md5=md5,
                                                                       preprocessing=KERAS_PREPROCESSING))
        assert main(["predict", "--weights", "keras", *args]) == 0
        from_keras = _top5(capsys.readouterr().out)
        assert main(["convert", "keras", str(tmp_path / "keras.safetensors")]) == 0
        capsys.readouterr()
    assert hits == [f"/{KERAS_FILE}"]  # downloaded once, then the verified cache

    # What the file's weights say, computed here: Keras's preprocessing (299, no crop), ImageNet names.
    names = xception.imagenet_classes()
    x = torch.stack([KERAS_PREPROCESSING.eval_transform()(Image.open(p)) for p in photos])
    with torch.no_grad():
        probs = keras_model(x).softmax(dim=1)
    expected = [[(p.label, p.prob) for p in row] for row in decode_predictions(probs, 5)]
    assert [[n for n, _ in row] for row in from_keras] == [[n for n, _ in row] for row in expected]
    assert all(n in names for row in from_keras for n, _ in row)
    np.testing.assert_allclose([[q for _, q in row] for row in from_keras],
                               [[q for _, q in row] for row in expected], rtol=1e-4)

    assert main(["predict", "--weights", str(tmp_path / "keras.safetensors"), *args]) == 0
    assert _top5(capsys.readouterr().out) == from_keras  # the converted file: same top-5, same probabilities
    assert main(["predict", "--checkpoint", str(tmp_path / "keras.safetensors"), photos[0], "--workers", "0",
                 "--device", "cpu", "--topk", "1"]) == 0  # --checkpoint is the same option
    assert capsys.readouterr().out.strip() == f"{photos[0]}: {from_keras[0][0][0]} {from_keras[0][0][1]:.3f}"


# ---- many inputs, some bad ---------------------------------------------------------------------


def test_mixed_inputs_every_bad_one_named_every_good_one_classified(small_weights, tmp_path, capsys):
    good = [save_photo(tmp_path / "a.png", (40, 30), 0), save_photo(tmp_path / "folder" / "b.jpg", (30, 30), 1),
            save_photo(tmp_path / "folder" / "sub" / "c.png", (50, 40), 2), save_photo(tmp_path / "d.png", (32, 32), 3)]
    (tmp_path / "folder" / "readme.txt").write_text("skipped: a folder's non-image files are not inputs")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    (tmp_path / "empty").mkdir()
    bad = {str(tmp_path / "missing.png"): "no such file or folder", str(corrupt): "corrupt.png",
           str(text): "notes.png", str(tmp_path / "nothing" / "*.jpg"): "no files match",
           str(tmp_path / "empty"): "no images in this folder"}
    inputs = [str(good[0]), str(tmp_path / "missing.png"), str(tmp_path / "folder"), str(corrupt), str(text),
              str(tmp_path / "nothing" / "*.jpg"), str(tmp_path / "d*.png"), str(tmp_path / "empty")]
    assert expand_inputs(inputs)[1] == (tmp_path / "missing.png", "no such file or folder")

    rc = main(["predict", "--weights", str(small_weights), *inputs, "--topk", "3", "--workers", "0",
               "--batch-size", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    out, err = captured.out.splitlines(), captured.err.splitlines()
    assert [line.split(": ")[0] for line in out] == [str(p) for p in good]  # every good one, in input order
    for line in out:
        assert sorted(name for name, _ in (t.rsplit(" ", 1) for t in line.split(": ", 1)[1].split(", "))) == \
            ["cat", "dog", "fox"]
    assert len(err) == len(bad)
    for (path, why), line in zip(bad.items(), err):
        assert line.startswith(f"xception predict: error: {path}: ") and why in line

    rc = main(["predict", "--weights", str(small_weights), *inputs, "--json", "--workers", "0", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1 and len(rows) == len(good) + len(bad)
    assert [r["path"] for r in rows if "error" in r] == list(bad)


def test_bad_inputs_give_one_line_errors(small_weights, tmp_path, capsys):
    photo = str(save_photo(tmp_path / "p.png", (32, 32), 0))
    cases = [
        (["predict", "--weights", "imagenet", photo], "weights not found: imagenet (neither a file nor a named "
                                                      "source: keras, keras_notop, timm)"),
        (["predict", "--weights", str(tmp_path / "absent.safetensors"), photo], "absent.safetensors"),
        (["explain", "--weights", str(small_weights), photo, "--class", "wolf", "--out", str(tmp_path / "x")],
         "class 'wolf' is not one of the model's 3 classes"),
        (["explain", "--weights", str(small_weights), photo, "--class", "dgo", "--out", str(tmp_path / "x")],
         "did you mean 'dog'?"),
        (["explain", "--weights", str(small_weights), photo, "--methods", "gradcam,magic",
          "--out", str(tmp_path / "x")], "got magic"),
        (["eval", "--weights", "timm_weights_v9", "--data", str(tmp_path)], "weights not found: timm_weights_v9"),
    ]
    for args, message in cases:
        rc = main(args)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())  # nothing written


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_every_model_command_takes_weights_and_the_checkpoint_alias(small_weights, tmp_path, capsys):
    parser = build_parser()
    required = {"predict": ["img"], "explain": ["img"], "eval": ["--data", "d"], "export": ["--format", "onnx", "o"],
                "bench": [], "app": [], "summary": []}
    for command, rest in required.items():
        for flag in ("--weights", "--checkpoint"):
            assert parser.parse_args([command, flag, "W", *rest]).weights == "W"
    out = tmp_path / "m.pt"
    assert main(["export", "--weights", str(small_weights), "--format", "torchscript", str(out), "--no-check"]) == 0
    model = torch.jit.load(str(out))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)  # traced at the file's image size, its 3 classes


# ---- the Python API ----------------------------------------------------------------------------


def test_classifier_api(small_weights, tmp_path):
    photo = save_photo(tmp_path / "p.png", (48, 40), 0)
    clf = xception.Classifier(small_weights, device="cpu")
    assert clf.class_names == ["cat", "dog", "fox"] and clf.preprocessing.image_size == 32
    top = clf(photo, topk=2)
    assert len(top) == 2 and top[0].prob >= top[1].prob and {p.label for p in top} <= {"cat", "dog", "fox"}

    array = np.asarray(Image.open(photo).convert("RGB"))
    many = clf([str(photo), Image.open(photo), array], topk=3)
    assert len(many) == 3 and many[0] == many[1] == many[2]  # a path, a PIL image, an array: one answer
    with torch.no_grad():
        direct = clf.model(clf.preprocessing.eval_transform()(Image.open(photo))[None]).softmax(dim=1)[0]
    assert [p.prob for p in sorted(many[0], key=lambda p: p.index)] == pytest.approx(direct.tolist(), rel=1e-5)
    assert clf.probabilities([photo] * 3).sum(dim=1).tolist() == pytest.approx([1.0] * 3)

    explanation = clf.explain(photo, classes=["dog", 0])
    assert [t.label for t in explanation.targets] == ["dog", "cat"]
    assert explanation.targets[0].prob == pytest.approx(direct[1].item(), rel=1e-5)
    assert set(explanation.heatmaps) == {"gradcam", "gradcam++"} and explanation.layer == "features"
    for maps in explanation.heatmaps.values():
        assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert explanation.image.shape == (32, 32, 3)
    path = explanation.save(tmp_path / "why.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bigger = xception.Classifier(small_weights, device="cpu", image_size=48)
    assert bigger.preprocessing.image_size == 48
    assert bigger.explain(photo, topk=1, methods=["layercam"]).heatmaps["layercam"].shape == (1, 48, 48)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        clf(tmp_path / "nope.png")
