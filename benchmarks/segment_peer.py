"""DeepLabv3+ Xception-65: ours against segmentation_models_pytorch's ``DeepLabV3Plus`` with the
``tu-xception65`` encoder (timm's aligned Xception-65), side by side on the CPU.

    python benchmarks/segment_peer.py --out benchmarks/segment_peer_avx2_2cores.json

Both at output stride 16, random initialisation (no weights can be downloaded here), the same
seed, the same synthetic set of shapes (``xception.segmentation.synthetic``), the same recipe
(SGD 0.9, poly lr 0.007, weight decay 4e-5, random scale 0.5-2.0, crop, flip) and the same
batches in the same order. Reported:

* training: images/s over the timed steps and the held-out mIoU after ``--steps`` steps (one
  confusion matrix over every pixel of the val split); the two models train in lockstep, one
  step of each per batch, so that the machine's drift hits both alike;
* inference at batch 1: ours through ``xception.optimize`` (fp32, compiled with Inductor
  freezing) against the peer eager and the peer under ``torch.compile``, median latency of
  interleaved rounds, at 512x512 (the peer needs sides divisible by 16: at 513x513 its decoder's
  concatenation fails, 132 vs 129) and ours also at 513x513;
* peak training memory (resident set of a fresh process) of one step at crop 512, batch 4, with
  and without encoder gradient checkpointing, for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xception import optimize  # noqa: E402
from xception.data.images import collate_skip  # noqa: E402
from xception.data.sampling import EpochSampler, IndexedDataset, ShardSampler  # noqa: E402
from xception.data.segmentation import (SegmentationDataset, SegmentationEvalTransform,  # noqa: E402
                                        SegmentationTrainTransform)
from xception.segmentation import DeepLabV3Plus  # noqa: E402
from xception.segmentation.evaluate import evaluate_segmentation  # noqa: E402
from xception.segmentation.synthetic import make_shapes  # noqa: E402
from xception.segmentation.train import poly_schedule  # noqa: E402


def build(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "ours":
        return DeepLabV3Plus(backbone="xception65", num_classes=num_classes, output_stride=16)
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus(encoder_name="tu-xception65", encoder_weights=None, encoder_output_stride=16,
                             classes=num_classes)


def set_checkpointing(name: str, model: torch.nn.Module) -> None:
    if name == "ours":
        model.set_grad_checkpointing(True)
    else:
        model.encoder.model.set_grad_checkpointing(True)


def cpu_class() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return "avx512_vnni" if "avx512_vnni" in flags else "avx_vnni" if "avx_vnni" in flags else \
        "avx2" if "avx2" in flags else "other"


# --- training and mIoU -----------------------------------------------------------------------------


def train_and_score(names: tuple[str, ...], data: Path, args: argparse.Namespace) -> dict:
    """Train every model of ``names`` in lockstep: each batch goes through one optimizer step of each
    in turn (timed one by one, the order reversed every other step), so the machine's drift over the
    run hits them alike."""
    train = SegmentationDataset(data, "train", transform=SegmentationTrainTransform(args.crop, (0.5, 2.0)))
    val = SegmentationDataset(data, "val", transform=SegmentationEvalTransform())
    sampler = EpochSampler(train, seed=args.seed)
    loader = DataLoader(IndexedDataset(train), batch_size=args.batch, sampler=sampler, collate_fn=collate_skip,
                        drop_last=True)
    runs = {}
    for name in names:
        model = build(name, train.num_classes, args.seed).train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 4e-5}, {"params": rest, "weight_decay": 0.0}],
                              lr=0.007, momentum=0.9)
        runs[name] = {"model": model, "opt": opt, "sched": poly_schedule(opt, args.steps, 0.9), "timed": 0.0,
                      "losses": []}
    step, epoch, images = 0, 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            order = list(runs.values())
            for run in order if step % 2 == 0 else order[::-1]:  # neither always goes first
                t0 = time.perf_counter()
                loss = F.cross_entropy(run["model"](batch.images), batch.targets, ignore_index=255)
                run["opt"].zero_grad(set_to_none=True)
                loss.backward()
                run["opt"].step()
                run["sched"].step()
                if step >= args.warmup_steps:
                    run["timed"] += time.perf_counter() - t0
                run["losses"].append(loss.item())
            if step >= args.warmup_steps:
                images += len(batch.images)
            step += 1
            if step >= args.steps:
                break
        epoch += 1
    val_loader = DataLoader(IndexedDataset(val), batch_size=1, sampler=ShardSampler(len(val)), collate_fn=collate_skip)
    out = {}
    for name, run in runs.items():
        scores = evaluate_segmentation(run["model"], val_loader, num_classes=train.num_classes,
                                       device=torch.device("cpu"))
        out[name] = {"images_per_s": images / run["timed"], "val_miou": scores.miou,
                     "val_pixel_accuracy": scores.pixel_accuracy, "first_loss": run["losses"][0],
                     "last_loss": statistics.mean(run["losses"][-5:]), "steps": args.steps}
    return out


# --- inference -------------------------------------------------------------------------------------


def inference(args: argparse.Namespace) -> dict:
    x = torch.randn(1, 3, 512, 512)
    x513 = torch.randn(1, 3, 513, 513)
    ours = build("ours", 21, args.seed).eval()
    peer = build("smp", 21, args.seed).eval()
    candidates = {}
    t0 = time.perf_counter()
    candidates["ours optimize (fp32, compiled)"] = optimize(ours, dtype="fp32", mode="compile", example_shape=(1, 3, 512, 512))
    compile_ours = time.perf_counter() - t0
    candidates["peer eager"] = peer
    t0 = time.perf_counter()
    compiled_peer = torch.compile(peer)
    with torch.no_grad():
        compiled_peer(x)
    compile_peer = time.perf_counter() - t0
    candidates["peer torch.compile"] = compiled_peer
    times = {k: [] for k in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            fn(x)
        for _ in range(args.rounds):  # interleaved: the machine's drift hits every candidate alike
            for key, fn in candidates.items():
                t0 = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - t0)
        fast = candidates["ours optimize (fp32, compiled)"]
        fast(x513)
        at_513 = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fast(x513)
            at_513.append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    median["ours optimize (fp32, compiled) at 513x513"] = statistics.median(at_513)
    ours_key = "ours optimize (fp32, compiled)"
    return {"median_latency_ms": {k: 1000 * v for k, v in median.items()},
            "images_per_s": {k: 1 / v for k, v in median.items()},
            "speedup_vs_peer_eager": median["peer eager"] / median[ours_key],
            "speedup_vs_peer_compiled": median["peer torch.compile"] / median[ours_key],
            "compile_seconds": {"ours": compile_ours, "peer": compile_peer}, "rounds": args.rounds}


# --- peak training memory (each in a fresh process) ------------------------------------------------


def memory_child(name: str, checkpointing: bool, crop: int, batch: int) -> None:
    model = build(name, 21, 0).train()
    if checkpointing:
        set_checkpointing(name, model)
    x, y = torch.randn(batch, 3, crop, crop), torch.randint(0, 21, (batch, crop, crop))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    F.cross_entropy(model(x), y).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "before_step_mib": before / 1024}))


def memory(args: argparse.Namespace) -> dict:
    out = {}
    for name in ("ours", "smp"):
        for ckpt in (False, True):
            proc = subprocess.run([sys.executable, __file__, "--memory-child", name, str(int(ckpt))],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                out[f"{name} checkpointing={ckpt}"] = {"error": proc.stderr[-500:]}
                continue
            out[f"{name} checkpointing={ckpt}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--images", type=int, default=32, help="training images of the synthetic set (val: a quarter)")
    p.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train,inference,memory")
    p.add_argument("--out")
    p.add_argument("--memory-child", nargs=2, metavar=("NAME", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], bool(int(args.memory_child[1])), 512, 4)
        return
    skip = set(filter(None, args.skip.split(",")))
    report = {"cpu": platform.processor() or platform.machine(), "cpu_class": cpu_class(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    try:
        import segmentation_models_pytorch as smp

        report["smp"] = smp.__version__
    except ImportError:
        sys.exit("pip install segmentation-models-pytorch (the peer)")
    if "train" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_shapes(Path(tmp) / "shapes", train=args.images, val=max(4, args.images // 4), size=args.size,
                               seed=args.seed)
            report["training"] = train_and_score(("ours", "smp"), data, args)
        t = report["training"]
        report["training"]["ratio_images_per_s"] = t["ours"]["images_per_s"] / t["smp"]["images_per_s"]
        report["training"]["miou_points_vs_peer"] = 100 * (t["ours"]["val_miou"] - t["smp"]["val_miou"])
        save(report, args.out)
    if "inference" not in skip:
        report["inference_bs1"] = inference(args)
        save(report, args.out)
    if "memory" not in skip:
        report["peak_training_memory_512_bs4"] = memory(args)
    print(save(report, args.out))


def save(report: dict, out: str | None) -> str:
    """The report as JSON, also written to ``out`` (after each part: a later failure keeps it)."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
