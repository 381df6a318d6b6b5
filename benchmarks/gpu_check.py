"""One-shot GPU check for a session with a CUDA machine: parity of every fast path, then timings.

    PYTHONPATH=src python benchmarks/gpu_check.py            # writes JSON under $OUT (or ./gpu_out)
    PYTHONPATH=src python benchmarks/gpu_check.py models bench1      # or some steps only

1. Model parity: optimize(mode=eager, +CUDA graphs) in fp32 and bf16 against the fp32 eager
   model (mode=compile: the bench steps' rel_error column) (random weights, random BN
   statistics), seed config and the 'same'-padding / output_stride=16 configs, at 299 and an odd
   size. On the GPU, cuDNN's convs run in TF32 by default, so fp32 references are computed on the CPU.
2. `xception bench` on CUDA: batch 256 bf16 (ours eager/compile vs timm eager + compile, bf16,
   channels-last) and batch 1 (with CUDA graphs), JSON in $OUT.
The host's CPU flags (AVX2 / AVX-512 VNNI / AMX) are recorded too. Prints a short table last.
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
from xception.bench.harness import randomize_batchnorm_  # noqa: E402
from xception.deploy.cpu import cpu_flags  # noqa: E402
from xception.deploy.optimize import optimize  # noqa: E402
from xception.deploy.parity import relative_error  # noqa: E402

OUT = Path(os.environ.get("OUT", ROOT / "gpu_out"))
OUT.mkdir(parents=True, exist_ok=True)
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
summary: list[str] = []
record: dict = {"device": None, "torch": torch.__version__, "checks": []}


def check(name: str, err: float, bound: float) -> None:
    ok = err <= bound
    record["checks"].append({"name": name, "rel_error": err, "bound": bound, "ok": ok})
    summary.append(f"{'ok ' if ok else 'BAD'} {name}: {err:.2e} (<= {bound:g})")


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
            for mode in ("eager",):
                for dtype in (torch.float32, torch.bfloat16):
                    for graphs in (False, True):
                        name = f"model {config or 'seed'} {size} {mode}{'+graphs' if graphs else ''} {dtype}"
                        try:
                            fast = optimize(model, device="cuda", dtype=dtype, mode=mode, cuda_graphs=graphs)
                            check(name, relative_error(fast(x), ref), BOUND[dtype])
                        except Exception as e:  # noqa: BLE001
                            record["checks"].append({"name": name, "error": repr(e), "ok": False})
                            summary.append(f"ERR {name}: {e!r}"[:200])


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
    "models": model_parity,
    "bench256": lambda: bench(256, "bench_cuda_bs256_bf16"),
    "bench1": lambda: bench(1, "bench_cuda_bs1_bf16"),
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
    record["host_cpu_flags"] = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                    "amx_int8", "amx_bf16"})
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
