"""`xception train / eval / predict` end to end on tiny synthetic images (2-core CPU friendly).

The pipeline tests use ``middle_blocks=0`` (7.9M parameters) at 16 px; one run uses the default
model. Exactness tests compare final state dicts with ``torch.equal``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from image_folders import make_image_folder
from runs import SMALL, assert_same_run

import xception
from xception.cli import main
from xception.training import engine, trainer
from xception.training.checkpoint import RecoverySchedule, load_checkpoint
from xception.weights import load_pretrained

SRC = str(Path(__file__).resolve().parents[2] / "src")
HOOKED = str(Path(__file__).resolve().parents[1] / "hooked_train.py")
def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "KERAS_BACKEND": "torch"}
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference_run(tiny_folder, tmp_path_factory) -> Path:
    """The uninterrupted run every resume test must reproduce: 2 epochs x 3 steps."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--epochs", "2", *SMALL]) == 0
    return out


def test_train_two_steps_then_eval_and_predict(tmp_path, capsys):
    """The default model, 2 steps; a corrupt training image is skipped and counted."""
    data = make_image_folder(tmp_path / "data", {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}})
    (data / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "4",
               "--image-size", "16", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                      "tensorboard"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    m = rows[0]
    assert {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"} <= m.keys()
    assert m["step"] == 2 and m["skipped_images"] == 1 and 0.0 <= m["val_top1"] <= 1.0 and m["val_top5"] == 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()  # written with or without TensorFlow
    assert [(e.step, e.value) for e in events.Scalars("val_top1")] == [(1, pytest.approx(m["val_top1"]))]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_name"] == "xception" and ckpt["class_names"] == ["cat", "dog"]
    assert ckpt["config"]["middle_blocks"] == 8 and ckpt["config"]["num_classes"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = load_pretrained(None, out / "last.pt")
    assert sum(p.numel() for p in model.parameters()) == 22_855_952 - 2048 * 998 - 998
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--json", "--workers", "0",
                 "--plot", str(tmp_path / "cm.png")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 4 and r["top1"] == pytest.approx(m["val_top1"]) and set(r["per_class"]) == {"cat", "dog"}
    assert r["loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    images = [str(data / "val" / "cat"), str(data / "train" / "cat" / "broken.png"), str(data / "val" / "dog" / "*.png")]
    assert main(["predict", "--checkpoint", str(out / "last.pt"), *images, "--json", "--topk", "2",
                 "--workers", "0"]) == 1  # one unreadable file -> non-zero, the others still predicted
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 5 and "broken.png" in captured.err and "error" in lines[2]
    good = [row for row in lines if "top" in row]
    assert len(good) == 4
    for row in good:
        assert [t["class"] for t in row["top"]] in (["cat", "dog"], ["dog", "cat"])
        assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)


def test_resume_at_epoch_boundary_is_bitwise(tiny_folder, reference_run, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--epochs", "1", *SMALL]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--epochs", "2", "--resume",
                 "--device", "cpu", "--workers", "0"]) == 0
    assert_same_run(out / "last.pt", reference_run / "last.pt")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_step_and_resume_is_bitwise(tiny_folder, reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, HOOKED, "--sigterm-at", "4", "--", "train", "--data", str(tiny_folder), "--out", str(out),
           "--epochs", "2", *SMALL]
    proc = _run(cmd, _env(), timeout=300)
    assert proc.returncode == 128 + 15, proc.stderr
    assert "SIGTERM" in proc.stderr and "--resume" in proc.stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (1, 4, 1)  # mid epoch 2, no step lost
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--resume", str(out / "last.pt"),
                 "--device", "cpu", "--workers", "0"]) == 0
    assert_same_run(out / "last.pt", reference_run / "last.pt")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_folder, reference_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference_run / "last.pt", out / "last.pt")
    before = (out / "last.pt").read_bytes()
    calls = {"n": 0}
    cross_entropy = engine.F.cross_entropy

    def nan_at_step_7(*args, **kwargs):  # the first loss after resuming at step 6: global step 7
        calls["n"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(engine, "F", types.SimpleNamespace(cross_entropy=nan_at_step_7))
    rc = main(["train", "--data", str(tiny_folder), "--out", str(out), "--resume", "--epochs", "3",
               "--device", "cpu", "--workers", "0"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and len(err.strip().splitlines()) == 1
    assert (out / "last.pt").read_bytes() == before


def test_bad_inputs_give_one_line_errors(tiny_folder, reference_run, tmp_path, capsys):
    def run(args: list[str]) -> tuple[int, str]:
        rc = main(args)
        return rc, capsys.readouterr().err.strip()

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    rc, err = run(["train", "--data", str(empty), "--out", str(tmp_path / "o1"), *SMALL])
    assert rc == 2 and "no class folders" in err and len(err.splitlines()) == 1

    holey = make_image_folder(tmp_path / "holey", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (holey / "train" / "c").mkdir()
    rc, err = run(["train", "--data", str(holey), "--out", str(tmp_path / "o2"), *SMALL])
    assert rc == 2 and "train/c has no images" in err and len(err.splitlines()) == 1

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = run(["train", "--data", str(tiny_folder), "--out", str(blocker / "run"), *SMALL])
    assert rc == 2 and "cannot write to output folder" in err and len(err.splitlines()) == 1

    foreign = tmp_path / "foreign.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    rc, err = run(["eval", "--checkpoint", str(foreign), "--data", str(tiny_folder)])
    assert rc == 2 and "foreign.pt: weights do not fit xception" in err and len(err.splitlines()) == 1

    other = tmp_path / "other.pt"
    torch.save({"format": "xception-checkpoint", "model_name": "resnet50", "config": {}, "model": {},
                "train_config": {"data": str(tiny_folder), "out": "x"}}, other)
    rc, err = run(["predict", "--checkpoint", str(other), str(tiny_folder)])
    assert rc == 2 and "resnet50" in err and len(err.splitlines()) == 1
    rc, err = run(["train", "--data", str(tiny_folder), "--out", str(tmp_path / "o3"), "--resume", str(other)])
    assert rc == 2 and "model 'resnet50', not 'xception'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o3").exists()  # nothing started

    rc, err = run(["predict", "--checkpoint", str(reference_run / "last.pt"), str(tmp_path / "nope.png")])
    assert rc == 1 and "nope.png: no such file or folder" in err and len(err.splitlines()) == 1  # named, not fatal


def test_val_split_run_and_eval_of_the_same_held_out_part(tmp_path, capsys):
    data = make_image_folder(tmp_path / "flat", {"": {"a": 4, "b": 4}})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--val-split", "0.25", "--out", str(out), "--epochs", "1", *SMALL]) == 0
    m = json.loads((out / "metrics.jsonl").read_text())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--json", "--workers", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 2 and r["loss"] == pytest.approx(m["val_loss"], rel=1e-5)  # the run's 2 held-out images


def test_fine_tune_from_a_foreign_imagenet_file(tmp_path):
    """--pretrained with a timm-layout 1000-class file: backbone loaded, a new 2-class classifier."""
    torch.manual_seed(0)
    source = xception.create_model("xception")
    weights = tmp_path / "timm_layout.pth"
    state = {k: v + 0.5 * torch.rand_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["last_linear.weight"] = state.pop("fc.weight")  # Cadene's name for the classifier
    state["last_linear.bias"] = state.pop("fc.bias")
    torch.save(state, weights)
    data = make_image_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--image-size", "16", "--workers", "0", "--device", "cpu", "--pretrained", str(weights),
                 "--lr", "1e-7"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["num_classes"] == 2 and ckpt["model"]["fc.weight"].shape == (2, 2048)
    # a tiny lr: after one step the backbone is still the file's (a fresh init would differ by ~0.05)
    for key in ("conv1.weight", "block4.rep.1.pointwise.weight", "bn4.weight"):
        torch.testing.assert_close(ckpt["model"][key], state[key], rtol=0, atol=1e-4)


# --- recovery checkpoints inside an epoch, --resume auto, multi-node ----------------------------


def test_save_interval_saves_last_pt_inside_the_epoch(tiny_folder, tmp_path, monkeypatch):
    """Steps: after every due step (not the epoch's last, saved anyway); minutes: no save until due."""
    saves: list[tuple[int, int, int]] = []
    save = trainer.save_checkpoint

    def recording_save(obj, path):
        saves.append((obj["epoch"], obj["step"], obj["epoch_step"]))
        save(obj, path)

    monkeypatch.setattr(trainer, "save_checkpoint", recording_save)
    args = ["train", "--data", str(tiny_folder), "--epochs", "1", *SMALL]
    assert main([*args, "--out", str(tmp_path / "a"), "--save-interval", "1steps"]) == 0
    assert saves == [(0, 1, 1), (0, 2, 2), (1, 3, 0)]
    saves.clear()
    assert main([*args, "--out", str(tmp_path / "b"), "--save-interval", "60min"]) == 0
    assert saves == [(1, 3, 0)]  # the interval is not due: no file written inside the epoch


def test_recovery_schedule_counts_minutes_or_steps_since_the_last_save():
    now = [100.0]
    minutes = RecoverySchedule("10min", step=5, clock=lambda: now[0])
    now[0] += 599.0
    assert not minutes.due(1000)
    now[0] += 1.0
    assert minutes.due(1001)
    minutes.saved(1001)
    assert not minutes.due(1002)
    steps = RecoverySchedule("3steps", step=4)
    assert [steps.due(s) for s in (5, 6, 7)] == [False, False, True]
    steps.saved(9)  # e.g. the end of an epoch
    assert not steps.due(11) and steps.due(12)
    for bad in ("10", "0min", "1.5steps", "-2steps", "ten min"):
        with pytest.raises(ValueError, match="save_interval must be minutes"):
            RecoverySchedule(bad)


def test_resume_auto_starts_a_run_refuses_others_and_reports_complete(tiny_folder, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint from a killed save")
    args = ["train", "--data", str(tiny_folder), "--out", str(out), "--resume", "auto", "--epochs", "1", *SMALL]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert f"no checkpoint at {out / 'last.pt'} yet: starting a new run" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                      "tensorboard"]  # the stale temporary is gone
    before = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    capsys.readouterr()
    caplog.clear()

    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "the run is complete (1 of 1 epochs): nothing to train" in caplog.text
    assert "training xception" not in caplog.text
    assert ((out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before
    assert "done: 1 epochs" in capsys.readouterr().out

    other = make_image_folder(tmp_path / "other", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    rc = main(["train", "--data", str(other), "--out", str(out), "--resume", "auto", "--epochs", "2", *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"is a run on {tiny_folder}, not {other}" in err and len(err.splitlines()) == 1
    rc = main([*args, "--model", "xception41"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model 'xception', not 'xception41'" in err and len(err.splitlines()) == 1
    assert ((out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def _last_save(killed_after: int, interval: int, steps_per_epoch: int) -> int:
    """The step of the last save before the kill: every epoch's end, and ``interval`` steps after
    the previous save."""
    last = 0
    for step in range(1, killed_after + 1):
        if step % steps_per_epoch == 0 or step - last >= interval:
            last = step
    return last


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_less_than_the_interval_and_resume_auto_is_bitwise(tiny_folder, reference_run,
                                                                                  tmp_path, caplog):
    interval, kill_after = 2, random.choice([1, 2, 4, 5])  # of the 6 steps; 3 is the end of epoch 1
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_folder), "--out", str(out), "--epochs", "2", *SMALL]
    proc = _run([sys.executable, HOOKED, "--sigkill-after", str(kill_after), "--", *args,
                 "--save-interval", f"{interval}steps"], _env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, (kill_after, proc.stderr[-2000:])
    saved = load_checkpoint(out / "last.pt")["step"] if (out / "last.pt").exists() else 0
    assert saved == _last_save(kill_after, interval, steps_per_epoch=3), (kill_after, saved)
    assert 0 <= kill_after - saved < interval, (kill_after, saved)  # plus the step in progress: < 1 interval
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume", "auto"]) == 0
    assert (f"resuming from {out / 'last.pt'} at epoch {saved // 3 + 1}, step {saved}" if saved
            else "starting a new run") in caplog.text
    assert_same_run(out / "last.pt", reference_run / "last.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_see_each_sample_once_and_resume(tmp_path):
    """Two torchrun agents (--nnodes=2, one process each) meet by c10d rendezvous on 127.0.0.1 and
    train over gloo; the first launch is stopped by SIGTERM mid epoch 2, the second resumes. (The
    ranks' sharding is torchrun's whether the two processes come from one agent or two: this test
    stands for --nproc_per_node=2 as well.)"""
    data = make_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 2}})
    out, log_dir = tmp_path / "run", tmp_path / "samples"
    log_dir.mkdir()

    def launch(*hook_args: str) -> list[subprocess.Popen]:
        port = _free_port()
        procs = []
        for _ in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
                   "--local_addr=127.0.0.1", "--max_restarts=0", HOOKED, "--samples", str(log_dir), *hook_args,
                   "--", "train", "--data", str(data), "--out", str(out), "--epochs", "2", "--resume", "auto", *SMALL]
            procs.append(subprocess.Popen(cmd, env=_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        return procs

    def wait(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
        results = []
        try:
            for proc in procs:
                out_text, err_text = proc.communicate(timeout=400)
                results.append((proc.returncode, out_text, err_text))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
        return results

    first = wait(launch("--sigterm-at", "3"))
    assert all(rc != 0 for rc, _, _ in first), [e[-1500:] for _, _, e in first]
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (1, 3, 1), [e[-1500:] for _, _, e in first]
    second = wait(launch())
    assert all(rc == 0 for rc, _, _ in second), [e[-3000:] for _, _, e in second]

    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        for line in (log_dir / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            per_epoch[row["epoch"]] += row["indices"]
    assert all(sorted(seen) == list(range(8)) for seen in per_epoch.values()), per_epoch  # once, across both launches
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                      "tensorboard"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 4
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 4) and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model is saved
    assert sum(o.count("done:") for _, o, _ in second) == 1  # rank 0 alone reports
