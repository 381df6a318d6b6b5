"""WebDataset shards: `xception shard`, reading by pattern / list file / pipe:, the stream sampler
(epochs, ranks, resume), training and evaluation from shards against the folder run."""

from __future__ import annotations

import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import pytest
from image_folders import make_image_folder
from runs import SMALL, assert_same_run

from xception.cli import main
from xception.data.datasets import SafeImageFolder
from xception.data.shards import StreamSampler, is_shard_spec, open_shards, write_shards
from xception.training import trainer
from xception.training.checkpoint import load_checkpoint
from xception.training.engine import StepHooks

PATTERN = "train-{000000..000002}.tar"
FIT = trainer.fit


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny folder (train: 3 cat + 3 dog, val: 2 + 2) and its shards of 2 images each."""
    root = tmp_path_factory.mktemp("shards")
    data = make_image_folder(root / "data", {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}})
    write_shards(data, root / "shards", shard_size=2)
    return data, root / "shards"


def _indices(sampler: StreamSampler) -> list[int]:
    return [raw.index for raw, _ in sampler]


def test_shard_writes_every_image_with_classes_and_counts_beside(shard_dir, capsys):
    data, out = shard_dir
    assert sorted(p.name for p in out.iterdir()) == ["shards.json", "train-000000.tar", "train-000001.tar",
                                                      "train-000002.tar", "train.txt", "val-000000.tar",
                                                      "val-000001.tar", "val.txt"]
    info = json.loads((out / "shards.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["shards"]["train-000002.tar"] == 2 and len(info["shards"]) == 5
    assert (out / "val.txt").read_text() == "val-000000.tar\nval-000001.tar\n"
    def samples(split: str, n: int) -> list[tuple[str, bytes, bytes]]:
        found = []
        for k in range(n):
            with tarfile.open(out / f"{split}-{k:06d}.tar") as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            keys = sorted({name.split(".")[0] for name in members})
            found += [(key, members[f"{key}.png"], members[f"{key}.cls"]) for key in keys]
        return found

    def folder(split: str) -> list[tuple[bytes, bytes]]:
        return [(Path(p).read_bytes(), str(t).encode()) for p, t in SafeImageFolder(data / split).samples]

    val = samples("val", 2)  # the folder's order: keys 0..3 in sequence
    assert [key for key, _, _ in val] == [f"{i:08d}" for i in range(4)]
    assert [(png, cls) for _, png, cls in val] == folder("val")
    train = samples("train", 3)  # all of the folder's images, shuffled so that shards mix the classes
    assert [key for key, _, _ in train] == [f"{i:08d}" for i in range(6)]
    assert sorted((png, cls) for _, png, cls in train) == sorted(folder("train"))
    assert [(png, cls) for _, png, cls in train] != folder("train")

    assert main(["shard", str(data / "train"), str(out.parent / "flat"), "--shard-size", "4"]) == 0
    assert "data: 6 images in 2 shards" in capsys.readouterr().out  # a flat class tree: one split, "data"
    assert main(["shard", str(data), str(out.parent / "bad"), "--shard-size", "0"]) == 2
    assert "shard_size must be an integer >= 1" in capsys.readouterr().err


def test_pattern_list_file_and_pipe_name_the_same_shards(shard_dir, tmp_path):
    _, out = shard_dir
    by_pattern = open_shards(str(out / PATTERN))
    by_list = open_shards(str(out / "train.txt"))
    assert by_pattern.urls == by_list.urls and by_pattern.counts == (2, 2, 2) and by_pattern.classes == ("cat", "dog")
    piped = tmp_path / "piped.txt"
    piped.write_text("".join(f"pipe:cat {u}\n" for u in by_list.urls))
    (tmp_path / "shards.json").write_text((out / "shards.json").read_text())
    by_pipe = open_shards(str(piped))
    assert by_pipe.counts == (2, 2, 2)
    assert _indices(StreamSampler(by_pipe, shuffle=False)) == _indices(StreamSampler(by_list, shuffle=False))
    assert open_shards(f"pipe:cat {out}/{PATTERN}").counts == (2, 2, 2)  # shards.json beside the piped path
    assert is_shard_spec(str(piped)) and is_shard_spec("pipe:curl -s https://x/a.tar") and not is_shard_spec(str(out))


def test_stream_sampler_epochs_ranks_and_resume_position(shard_dir):
    _, out = shard_dir
    shards = open_shards(str(out / PATTERN))
    one = StreamSampler(shards, seed=3, buffer=4)
    epoch0 = _indices(one)
    assert sorted(epoch0) == list(range(6)) and len(one) == 6  # every sample once per epoch
    assert _indices(one) == epoch0  # the order is a function of (seed, epoch)
    one.set_epoch(1)
    epoch1 = list(one)
    assert sorted(raw.index for raw, _ in epoch1) == list(range(6)) and [r.index for r, _ in epoch1] != epoch0
    one.set_epoch(1, start=4)
    assert [(r.index, s) for r, s in one] == [(r.index, s) for r, s in epoch1[4:]] and len(one) == 2

    ranks = [StreamSampler(shards, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    # rank 0 reads shards 0 and 2 (4 samples), rank 1 shard 1 (2): both take 2 per epoch
    assert [len(s) for s in ranks] == [2, 2] and ranks[0].left_out == 2
    seen = [_indices(s) for s in ranks]
    assert set(seen[0]) <= {0, 1, 4, 5} and set(seen[1]) == {2, 3}
    evals = [StreamSampler(shards, num_replicas=2, rank=r, shuffle=False) for r in (0, 1)]
    assert [_indices(s) for s in evals] == [[0, 1, 4, 5], [2, 3]]  # evaluation: all, in order, no seeds
    assert all(seed is None for _, seed in evals[0])
    with pytest.raises(ValueError, match="3 shard.* for 4 ranks: every rank needs a shard"):
        StreamSampler(shards, num_replicas=4, rank=0)


def test_shard_errors_are_one_line(shard_dir, tmp_path, capsys):
    _, out = shard_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (copy / name).write_bytes((out / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no shards.json"):
        open_shards(str(copy / "train-{000000..000001}.tar"))
    info = json.loads((out / "shards.json").read_text())
    info["shards"]["train-000001.tar"] = 3  # does not match the shard
    (copy / "shards.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="shard not found: .*train-000002.tar"):
        open_shards(str(copy / PATTERN))
    shards = open_shards(str(copy / "train-{000000..000001}.tar"))
    with pytest.raises(ValueError, match="train-000001.tar holds 2 samples, shards.json says 3"):
        list(StreamSampler(shards, shuffle=False))
    (copy / "broken.txt").write_text(f"pipe:cat {copy}/missing-000000.tar\n")
    info["shards"]["missing-000000.tar"] = 2
    (copy / "shards.json").write_text(json.dumps(info))
    with pytest.raises(OSError, match="cannot read shard pipe:cat .*missing-000000.tar"):
        list(StreamSampler(open_shards(str(copy / "broken.txt")), shuffle=False))

    rc = main(["train", "--data", str(out / PATTERN), "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "needs --val-data" in err and len(err.splitlines()) == 1


def test_missing_extra_names_the_install_command(shard_dir, tmp_path, monkeypatch, capsys):
    _, out = shard_dir
    monkeypatch.setitem(sys.modules, "webdataset", None)
    for args in (["train", "--data", str(out / PATTERN), "--val-data", str(out / "val.txt"),
                  "--out", str(tmp_path / "run"), *SMALL],
                 ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(out / "val.txt")],
                 ["shard", str(out), str(tmp_path / "s"), "--shard-size", "2"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and 'pip install "xception[shards]"' in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


def _train_seeing(monkeypatch, args: list[str]) -> tuple[int, dict[int, list[int]]]:
    """Run ``xception train ARGS`` in-process, recording the sample indices of every batch."""
    seen: dict[int, list[int]] = {}
    hooks = StepHooks(on_batch=lambda epoch, indices: seen.setdefault(epoch, []).extend(indices.tolist()))
    monkeypatch.setattr(trainer, "fit", lambda cfg, hooks_=None: FIT(cfg, hooks))
    return main(args), seen


def test_train_and_eval_from_shards_match_the_folder(shard_dir, tmp_path, monkeypatch, capsys):
    """Evaluating one checkpoint on the val shards and on the val folder gives the same figures; a run
    on the shards sees every training image once per epoch (in another order than the folder run:
    the indices are positions in the shards, written shuffled)."""
    data, out = shard_dir
    piped = tmp_path / "val-piped.txt"
    piped.write_text("".join(f"pipe:cat {out}/val-{i:06d}.tar\n" for i in range(2)))
    (tmp_path / "shards.json").write_text((out / "shards.json").read_text())
    runs = {}
    for kind, data_args in {"folder": ["--data", str(data)],
                            "shards": ["--data", str(out / PATTERN), "--val-data", str(piped)]}.items():
        rc, seen = _train_seeing(monkeypatch, ["train", *data_args, "--out", str(tmp_path / kind), "--epochs", "2",
                                               *SMALL])
        assert rc == 0
        assert sorted(seen) == [0, 1] and all(sorted(ix) == list(range(6)) for ix in seen.values())
        runs[kind] = (seen, json.loads((tmp_path / kind / "metrics.jsonl").read_text().splitlines()[-1]))
    assert runs["folder"][0] != runs["shards"][0]  # the order of samples differs (shard order + buffer shuffle)
    capsys.readouterr()

    results = []
    for val in (str(data), str(out / "val.txt"), str(out / "val-{000000..000001}.tar"), str(piped)):
        assert main(["eval", "--checkpoint", str(tmp_path / "shards" / "last.pt"), "--data", val, "--json",
                     "--workers", "0"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert all(r["count"] == 4 for r in results)
    assert all((r["top1"], r["top5"], r["loss"], r["confusion"]) == (results[0]["top1"], results[0]["top5"],
                                                                     results[0]["loss"], results[0]["confusion"])
               for r in results)
    assert results[0]["loss"] == pytest.approx(runs["shards"][1]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_shard_run_resumes_exactly_after_sigterm_with_other_workers(shard_dir, tmp_path, monkeypatch):
    """SIGTERM after step 4 (mid epoch 2), resume with 2 DataLoader workers: bitwise the
    uninterrupted single-process-loader run (the stream order does not depend on the workers)."""
    _, out = shard_dir
    args = ["--data", str(out / "train.txt"), "--val-data", str(out / "val.txt"), "--epochs", "2", *SMALL]
    assert main(["train", *args, "--out", str(tmp_path / "ref")]) == 0

    def stop_at_4(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "fit", lambda cfg, hooks=None: FIT(cfg, StepHooks(after_step=stop_at_4)))
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_samples"]) == (1, 4, 2)
    monkeypatch.setattr(trainer, "fit", FIT)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "auto", "--workers", "2", *args[:4]]) == 0
    assert_same_run(tmp_path / "run" / "last.pt", tmp_path / "ref" / "last.pt")
