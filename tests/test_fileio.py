"""Atomic writes and the safe loader."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from xception.fileio import atomic_path, atomic_write, torch_load_safe


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"weight": torch.ones(2)}, path)
    before = path.read_bytes()

    def crash(f):
        f.write(b"half")
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    assert torch.equal(torch_load_safe(path)["weight"], torch.ones(2))


def test_atomic_path_replaces_only_on_success_with_the_given_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    with atomic_path(path, suffix=".tmp.onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.onnx") and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model.onnx"]
    with pytest.raises(KeyError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyError("writer failed")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    atomic_write(tmp_path / "a.txt", lambda f: f.write("x"), mode="w")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_safe_loader_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        torch_load_safe(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable PyTorch weights file") as e:
        torch_load_safe(tmp_path / "cut.pt")
    assert "\n" not in str(e.value)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(pytest.raises))  # a global, not a tensor
    with pytest.raises(ValueError, match=r"evil\.pkl: .*nothing from it was run"):
        torch_load_safe(tmp_path / "evil.pkl")
