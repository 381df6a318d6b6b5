"""Peak training memory with and without gradient checkpointing, on CPU.

Each mode runs in a fresh subprocess, so one mode's allocations cannot hide in the other's peak.
Two measures of one training step (forward, cross-entropy, backward):

- allocator peak: the most bytes PyTorch's CPU allocator held at once during the step, above
  what it held before (weights, batch), replayed from ``torch.profiler``'s memory events
  (``profile_memory=True``). Exact for tensors; blind to non-tensor memory.
- RSS: the whole process, from the operating system.

The child builds the model and the batch, runs a small warm-up step (kernels, libraries),
records its RSS (VmRSS), runs the step under the profiler, then reads the process's peak RSS
(``ru_maxrss``); "RSS step peak" = peak RSS - RSS before the step. Both measures include the
parameter gradients (fp32, as large as the weights), in both modes. glibc's mmap threshold is
fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS.

    PYTHONPATH=src python benchmarks/grad_checkpoint_memory.py --model xception65 --size 512 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    import torch

    from xception import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, output_stride=args.output_stride).train()
    if args.mode == "checkpoint":
        model.set_grad_checkpointing()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # A small warm-up step loads the kernels and libraries; its gradients are dropped again.
    torch.nn.functional.cross_entropy(model(x[:1, :, :64, :64]), y[:1]).backward()
    model.zero_grad(set_to_none=True)
    before = current_rss()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(dict(mode=args.mode, rss_before=before, peak=peak, step_peak=peak - before,
                          alloc_peak=allocator_peak(prof), params_bytes=params, seconds=seconds)))


def allocator_peak(prof) -> int:
    """Most bytes that PyTorch's CPU allocator held at once during the profile, above its start."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    sizes = [(e["ts"], e["args"]["Bytes"]) for e in events
             if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    live = peak = 0
    for _, size in sorted(sizes, key=lambda t: t[0]):
        live += size
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="xception65")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--output-stride", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["plain", "checkpoint"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)

    import torch

    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    # A fixed mmap threshold: glibc otherwise raises it after each large free and keeps later
    # tensors in a heap it does not shrink, so RSS would count freed memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    results = {}
    for mode in ("plain", "checkpoint"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--size", str(args.size),
               "--batch", str(args.batch), "--output-stride", str(args.output_stride),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])

    print(f"{args.model}, {args.batch}x3x{args.size}x{args.size}, output stride {args.output_stride}, "
          f"one training step on CPU (torch {torch.__version__}, {args.threads} threads)")
    print(f"weights: {results['plain']['params_bytes'] / MiB:.0f} MiB (the gradients add as much)")
    print(f"{'mode':<11} {'allocator peak':>15} {'RSS before':>11} {'peak RSS':>10} {'RSS step peak':>14} "
          f"{'step time':>10}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['alloc_peak'] / MiB:>11.0f} MiB {r['rss_before'] / MiB:>7.0f} MiB "
              f"{r['peak'] / MiB:>6.0f} MiB {r['step_peak'] / MiB:>10.0f} MiB {r['seconds']:>8.1f} s")
    plain, ckpt = results["plain"], results["checkpoint"]
    print(f"checkpointing: allocator peak {plain['alloc_peak'] / MiB:.0f} -> {ckpt['alloc_peak'] / MiB:.0f} MiB "
          f"({1 - ckpt['alloc_peak'] / plain['alloc_peak']:.0%} less); RSS step peak "
          f"{plain['step_peak'] / MiB:.0f} -> {ckpt['step_peak'] / MiB:.0f} MiB; peak RSS "
          f"{plain['peak'] / MiB:.0f} -> {ckpt['peak'] / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
