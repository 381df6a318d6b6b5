"""One-shot GPU check for a session with a CUDA machine: parity of every fast path, then timings.

    PYTHONPATH=src python benchmarks/gpu_check.py            # writes JSON under $OUT (or ./gpu_out)
    PYTHONPATH=src python benchmarks/gpu_check.py kernels models sweep   # or some steps only

1. Kernel parity at real shapes (728 channels, 19x19, batch 8; 2048 at 10x10): fused separable
   conv and max-pool + skip conv + add against the PyTorch references computed in float64 on the
   CPU (on the GPU, cuDNN's convs run in TF32 by default: ~2e-4 off), fp32 (<= 1e-5) and bf16
   (<= 2e-2), no NaN.
2. Model parity: optimize(mode=eager/fused, +CUDA graphs) in fp32 and bf16 against the
   fp32 eager model (mode=compile: the bench steps' rel_error column) (random weights, random BN statistics), seed config and the 'same'-padding /
   output_stride=16 configs, at 299 and an odd size.
3. A block-size sweep of the separable-conv kernel on a middle-flow layer at batch 256.
4. `xception bench` on CUDA: batch 256 bf16 (ours eager/compile/fused vs timm eager + compile,
   bf16, channels-last) and batch 1 (with CUDA graphs), JSON in $OUT.
Prints a short table last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import xception  # noqa: E402
from xception.inference import kernels  # noqa: E402
from xception.inference.bench import randomize_batchnorm_  # noqa: E402
from xception.inference.kernels import max_pool_add_reference, separable_conv_reference  # noqa: E402
from xception.inference.optimize import optimize  # noqa: E402
from xception.inference.parity import relative_error  # noqa: E402

OUT = Path(os.environ.get("OUT", ROOT / "gpu_out"))
OUT.mkdir(parents=True, exist_ok=True)
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
summary: list[str] = []
record: dict = {"device": None, "torch": torch.__version__, "checks": []}


def check(name: str, err: float, bound: float) -> None:
    ok = err <= bound
    record["checks"].append({"name": name, "rel_error": err, "bound": bound, "ok": ok})
    summary.append(f"{'ok ' if ok else 'BAD'} {name}: {err:.2e} (<= {bound:g})")


def kernel_parity() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (c, n, h, dil, relu_out, res) in [(728, 728, 19, 1, False, True), (1536, 2048, 10, 2, True, False)]:
            x = torch.randn(8, c, h, h, generator=g).cuda().to(dtype).contiguous(memory_format=torch.channels_last)
            dw = torch.randn(c, 1, 3, 3, generator=g).cuda().to(dtype)
            pw = (torch.randn(c, n, generator=g) / c ** 0.5).cuda().to(dtype)
            b = torch.randn(n, generator=g).cuda()
            r = torch.randn(8, n, h, h, generator=g).cuda().to(dtype) if res else None
            kw = dict(padding=dil, dilation=dil, relu_in=True, relu_out=relu_out, residual=r)
            out = kernels.separable_conv(x, dw, pw, b, **kw)
            ref = separable_conv_reference(*(t.cpu().double() for t in (x, dw, pw, b)),
                                           **{**kw, "residual": None if r is None else r.cpu().double()})
            check(f"sepconv {c}->{n} {h}x{h} d{dil} {dtype}", relative_error(out, ref), BOUND[dtype])
        for size, pad in [(147, 1), (74, "same"), (37, "same"), (38, 1)]:
            x = torch.randn(8, 256, size, size, generator=g).cuda().to(dtype).contiguous(memory_format=torch.channels_last)
            inp = torch.randn(8, 128, size, size, generator=g).cuda().to(dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(128, 256, generator=g) / 128 ** 0.5).cuda().to(dtype)
            b = torch.randn(256, generator=g).cuda()
            kw = dict(stride=2, padding=pad, skip_input=inp, skip_weight=w, skip_bias=b, skip_stride=2)
            out = kernels.max_pool_add(x, **kw)
            ref = max_pool_add_reference(x.cpu().double(), **{**kw, "skip_input": inp.cpu().double(),
                                                              "skip_weight": w.cpu().double(),
                                                              "skip_bias": b.cpu().double()})
            check(f"pool+skip {size} pad={pad} {dtype}", relative_error(out, ref), BOUND[dtype])


def model_parity() -> None:
    for config in (dict(), dict(pool_padding="same", output_stride=16)):
        torch.manual_seed(0)
        model = randomize_batchnorm_(xception.create_model("xception", **config)).eval()
        for size in (299, 225):
            x = torch.randn(4, 3, size, size)
            with torch.no_grad():
                ref = model(x)
            # compile mode's parity comes from bench256/bench1: each row carries its error against
            # the fp32 eager model, and compiling here as well would cost minutes of a short lease
            for mode in ("eager", "fused"):
                for dtype in (torch.float32, torch.bfloat16):
                    for graphs in (False, True):
                        name = f"model {config or 'seed'} {size} {mode}{'+graphs' if graphs else ''} {dtype}"
                        try:
                            fast = optimize(model, device="cuda", dtype=dtype, mode=mode, cuda_graphs=graphs)
                            check(name, relative_error(fast(x), ref), BOUND[dtype])
                        except Exception as e:  # noqa: BLE001
                            record["checks"].append({"name": name, "error": repr(e), "ok": False})
                            summary.append(f"ERR {name}: {e!r}"[:200])


def block_sweep() -> None:
    import triton.testing

    x = torch.randn(256, 728, 19, 19, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(728, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
    pw = torch.randn(728, 728, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(728, device="cuda")
    moved = (x.numel() * 2) * 2  # read + write, bytes
    rows = []
    # the default (64x128x16, 8 warps), the first default (64x128x32, 4 warps: spilled in residual
    # launches), and wider N tiles that recompute the depthwise part 3x instead of 6x at 728 channels
    # (32x256x16 compiles without spills for sm_90; 64x256x16 spills ~300 B in residual launches)
    for cfg in ["64,128,16,8", "64,128,32,4", "32,256,16,8", "64,256,16,8", "64,128,32,8", "128,128,16,8",
                "64,64,64,4", "64,256,32,8", "128,256,32,8"]:
        os.environ["XCEPTION_SEPCONV_BLOCKS"] = cfg
        try:
            ms = triton.testing.do_bench(lambda: kernels.separable_conv(x, dw, pw, b, relu_in=True, residual=x),
                                         warmup=25, rep=100, return_mode="median")
            rows.append({"blocks": cfg, "ms": ms, "GB/s (min bytes)": moved / ms / 1e6})
        except Exception as e:  # noqa: BLE001
            rows.append({"blocks": cfg, "error": repr(e)})
    os.environ.pop("XCEPTION_SEPCONV_BLOCKS", None)
    record["sepconv_block_sweep"] = rows
    for r in rows:
        summary.append(f"sweep {r}")


def bench(batch: int, name: str) -> None:
    cmd = [sys.executable, "-m", "xception", "bench", "--device", "cuda", "--batch-size", str(batch),
           "--image-size", "299", "--dtype", "bf16", "--compare", "timm", "--json", "--repeats", "3", "--min-round-s", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.time()
    # the log streams into $OUT, so a run cut short by the lease still says how far it got
    with open(OUT / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if proc.returncode != 0:
        summary.append(f"ERR bench {name}: rc {proc.returncode} {(OUT / f'{name}.log').read_text()[-300:]}")
        return
    (OUT / f"{name}.json").write_text(proc.stdout)
    rep = json.loads(proc.stdout)
    summary.append(f"bench {name} ({time.time() - start:.0f}s): best ours {rep['best_ours']} / best peer "
                   f"{rep['best_peer']} = {rep['speedup']}")
    for r in rep["results"]:
        summary.append(f"  {r['impl']:<5} {r['mode']:<40} {r['images_per_s'] or 0:>10.1f} img/s "
                       f"p50 {r['latency_ms_p50'] or 0:.3f} ms err {r['rel_error']}")


STEPS = {
    "kernels": kernel_parity,
    "models": model_parity,
    "bench256": lambda: bench(256, "bench_cuda_bs256_bf16"),
    "bench1": lambda: bench(1, "bench_cuda_bs1_bf16"),
    "sweep": block_sweep,
}

if __name__ == "__main__":
    # steps to run, in order (default: all); e.g. `gpu_check.py bench256 bench1` to split the work
    # over two device calls
    names = sys.argv[1:] or list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        sys.exit(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    record["device"] = torch.cuda.get_device_name(0)
    for name in names:
        start = time.time()
        try:
            STEPS[name]()
        except Exception:  # noqa: BLE001
            summary.append(f"ERR {name}: {traceback.format_exc()[-400:]}")
        summary.append(f"step {name}: {time.time() - start:.0f} s")
        (OUT / "gpu_check.json").write_text(json.dumps(record, indent=1))
        print(summary[-1], flush=True)
    print("\n".join(summary))
