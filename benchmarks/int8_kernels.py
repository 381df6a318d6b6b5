"""Our int8 CPU kernels against PyTorch's quantized kernels, in one process on one calibration:
the static int8 model run three ways (PyTorch's kernels only; our depthwise kernel; our depthwise
and 1x1 kernels), interleaved rounds, median latency, and each one's logit error against fp32.

    PYTHONPATH=src python benchmarks/int8_kernels.py --batch-size 1 --image-size 299 --threads 2 \\
        --json benchmarks/cpu_avx2_int8_kernels_bs1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xception import create_model  # noqa: E402
from xception.bench.harness import randomize_batchnorm_  # noqa: E402
from xception.deploy.parity import relative_error  # noqa: E402
from xception.deploy.int8.kernel_graph import with_cpu_kernels  # noqa: E402
from xception.deploy.int8.static import StaticInt8, calibrate_static  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = randomize_batchnorm_(create_model("xception").eval(), generator=gen)
    size = args.image_size
    calib = [torch.randn(1, 3, size, size, generator=gen) for _ in range(args.calibration)]
    x = torch.randn(args.batch_size, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = model(x)
    base = calibrate_static(model, calib)
    variants = {}
    for name, pointwise in (("pytorch kernels", None), ("ours: depthwise", False), ("ours: depthwise + 1x1 + adds", True)):
        q = StaticInt8(model, base.state, base.info)
        if pointwise is None:
            q.kernels = False
        else:
            built = with_cpu_kernels(q._quantized, pointwise=pointwise)
            if built is None:
                print(f"{name}: our kernels are unavailable here", file=sys.stderr)
                continue
            q.__dict__["_fast"] = built[0]
        variants[name] = (q, relative_error(q(x), ref))  # also traces and freezes the graph
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (q, _) in variants.items():
            start = time.perf_counter()
            q(x)
            times[name].append(time.perf_counter() - start)
    rows = []
    base_ms = None
    for name, (q, err) in variants.items():
        ms = sorted(times[name])[len(times[name]) // 2] * 1e3
        base_ms = base_ms or ms
        rows.append({"variant": name, "ms_per_batch": ms, "images_per_s": args.batch_size * 1e3 / ms,
                     "speedup_vs_pytorch_kernels": base_ms / ms, "rel_error": err})
        print(f"{name:<24} {ms:8.1f} ms  {args.batch_size * 1e3 / ms:6.2f} images/s  {base_ms / ms:5.2f}x  "
              f"logits vs fp32 {err:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "image_size": size,
                                               "threads": args.threads, "torch": torch.__version__,
                                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
