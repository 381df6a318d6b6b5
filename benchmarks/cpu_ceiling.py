"""The CPU's arithmetic ceilings for Xception's main layer, and how close each engine gets.

    PYTHONPATH=src python benchmarks/cpu_ceiling.py --threads 2 --bench benchmarks/cpu_avx2_bs1_299_2threads.json

Times the middle flow's 1x1 convolution (361 pixels x 728 -> 728 channels, 191 MMAC) as
fp32 and bf16 matrix products (``torch.matmul``, oneDNN), an int8 x int8 -> int32 product
(``torch._int_mm``, the dynamic int8 path's kernel), the quantized 1x1 conv of PyTorch's oneDNN
backend (7-bit activations where the CPU has no VNNI), and our own int8 1x1 conv kernel
(``torch.ops.xception.pw_conv_int8``, 7-bit weights: what the static int8 path runs where the
kernels build); median of 5 rounds.
With ``--bench``, each row of an ``xception bench --json`` report is turned into GMAC/s over the
whole network (8.39 GMAC per 299 px image) and a fraction of the best measured kernel rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xception.deploy.cpu import cpu_flags, cpu_has_int8_dot, cpu_has_native_bf16  # noqa: E402
from xception.deploy.int8.prepare import STATIC_ENGINE, activation_qconfig, quantized_engine  # noqa: E402

M, K, N = 361, 728, 728  # the middle flow's pointwise conv at 299 px
NETWORK_GMAC = 8.39  # per 299x299 image (the paper's Xception; our seed model counts the same)


def median_seconds(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return sorted(rounds)[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="append", default=[], help="an xception bench --json report (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    macs = M * K * N
    a, b = torch.randn(M, K), torch.randn(K, N)
    rates = {"fp32 matmul": macs / median_seconds(lambda: a @ b, 20) / 1e9}
    ab, bb = a.bfloat16(), b.bfloat16()
    slow = not cpu_has_native_bf16()
    rates["bf16 matmul"] = macs / median_seconds(lambda: ab @ bb, 2 if slow else 20) / 1e9
    qa = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    qb = torch.randint(-127, 128, (K, N), dtype=torch.int8)
    rates["int8 torch._int_mm"] = macs / median_seconds(lambda: torch._int_mm(qa, qb),
                                                        2 if not cpu_has_int8_dot() else 20) / 1e9
    import torch.ao.nn.quantized as nnq

    with quantized_engine(STATIC_ENGINE):
        conv = nnq.Conv2d(K, N, 1)
        w = torch.quantize_per_channel(torch.randn(N, K, 1, 1), torch.rand(N) * 0.01 + 1e-3,
                                       torch.zeros(N, dtype=torch.long), 0, torch.qint8)
        conv.set_weight_bias(w, torch.zeros(N))
        x = torch.randn(1, K, 19, 19).contiguous(memory_format=torch.channels_last)
        quant_max = 127 if activation_qconfig() == "x86" else 255
        xq = torch.quantize_per_tensor(x.clamp(min=0), 4.0 / quant_max, 0, torch.quint8)
        rates[f"int8 quantized 1x1 conv ({STATIC_ENGINE})"] = macs / median_seconds(lambda: conv(xq), 20) / 1e9
        from xception.deploy import kernels as cpu_kernels
        from xception.deploy.int8.kernel_graph import Int8Pointwise

        if cpu_kernels.load():
            ours = Int8Pointwise(conv)
            rates["int8 1x1 conv, ours (7-bit weights)"] = macs / median_seconds(lambda: ours(xq), 20) / 1e9
    flags = cpu_flags()
    report = {"threads": args.threads, "shape": [M, K, N], "gmac_per_s": rates,
              "native_bf16": cpu_has_native_bf16(flags), "int8_dot": cpu_has_int8_dot(flags),
              "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "networks": []}
    for name, rate in rates.items():
        print(f"{name:<40} {rate:8.1f} GMAC/s")
    best_float = max(rates["fp32 matmul"], rates["bf16 matmul"])
    best_int8 = max(v for k, v in rates.items() if k.startswith("int8"))
    for path in args.bench:
        bench = json.loads(Path(path).read_text())
        if bench["image_size"] != 299:
            continue
        print(f"\n{path} (batch {bench['batch_size']}): whole network")
        for row in bench["results"]:
            if not row.get("images_per_s"):
                continue
            gmac = row["images_per_s"] * NETWORK_GMAC
            ceiling = best_int8 if row.get("precision") == "int8" else best_float
            entry = {"bench": path, "impl": row["impl"], "mode": row["mode"], "precision": row.get("precision"),
                     "images_per_s": row["images_per_s"], "gmac_per_s": gmac, "fraction_of_ceiling": gmac / ceiling}
            report["networks"].append(entry)
            print(f"  {row['impl']:<12} {row['mode']:<40} {gmac:7.1f} GMAC/s = {gmac / ceiling:5.0%} of "
                  f"{'int8' if row.get('precision') == 'int8' else 'float'} kernel rate")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
