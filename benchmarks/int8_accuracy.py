"""Int8 accuracy on real data: top-1 on the 360 held-out digits of the demo's model, in fp32 and in
int8 for us and for each int8 peer (ONNX Runtime static QDQ, OpenVINO + NNCF), all calibrated on
the same training images. Each path's logits are also compared with our fp32 logits (relative L2
error over the 360 images), and the misclassified images are listed by index.

    xception demo --out demo_out                      # trains the digits model (demo_out/run/best.pt)
    PYTHONPATH=src python benchmarks/int8_accuracy.py demo_out/run/best.pt --images 128 \
        --json benchmarks/int8_accuracy_digits.json

The calibration images are a seeded draw from the digits' training split (never the held-out
ones), preprocessed like evaluation; every int8 path gets exactly these tensors. With ``--seeds N``
the int8 paths are calibrated again on N draws (seeds 0 .. N-1) and each draw's top-1 is reported
with the mean: one borderline image moves a path's top-1 by 0.28 points from draw to draw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xception.inference.classify import load_model  # noqa: E402
from xception.deploy.optimize import optimize  # noqa: E402
from xception.bench.peers import openvino_candidates, ort_candidates  # noqa: E402
from xception.deploy.int8.calibrate import calibration_set  # noqa: E402
from xception.deploy.int8.static import StaticInt8, calibrate_static  # noqa: E402
from xception.data.datasets import DigitsDataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="the digits model (a training checkpoint or .safetensors)")
    ap.add_argument("--images", type=int, default=128, help="calibration images from the training split")
    ap.add_argument("--seeds", type=int, default=1, help="calibration draws (seeds 0 .. N-1) for the int8 paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.weights, device="cpu", int8=False)
    pre = model.preprocessing
    val = DigitsDataset("val", pre.eval_transform())
    labels = torch.tensor([y for _, y in val])
    reference = None  # our fp32 logits: every other path's relative L2 error is against them
    results, draws = {}, {}

    def evaluate(name, run):
        nonlocal reference
        if isinstance(run, Exception):
            return {"error": f"{type(run).__name__}: {run}"}
        with torch.no_grad():
            logits = torch.cat([run(x[None]).float() for x, _ in val])
        reference = logits if reference is None else reference
        correct = int((logits.argmax(1) == labels).sum())
        wrong = (logits.argmax(1) != labels).nonzero().flatten().tolist()
        row = {"top1": 100.0 * correct / len(val), "correct": correct, "wrong_images": wrong,
               "logits_rel_error": float((logits - reference).norm() / reference.norm())}
        print(f"{name:<50} top-1 {row['top1']:.2f}% ({correct}/{len(val)}), logits off fp32 by "
              f"{row['logits_rel_error']:.2e}, wrong: {wrong}", flush=True)
        return row

    for seed in range(args.seeds):
        calib = [x[None] for x, _ in calibration_set("digits", pre, args.images, seed=seed)]
        shape = (1, *calib[0].shape[1:])
        runners = {"ours fp32": lambda x: model(x)} if seed == 0 else {}
        start = time.perf_counter()
        ours = calibrate_static(model, calib, info={"calibration_data": "digits train split", "seed": seed})
        runners["ours int8 (static)"] = ours
        print(f"seed {seed}: ours int8 calibrated in {time.perf_counter() - start:.1f} s; our kernels: "
              f"{ours.uses_cpu_kernels}", flush=True)
        if ours.uses_cpu_kernels:  # the same calibration on PyTorch's quantized kernels (8-bit 1x1 weights)
            theirs = StaticInt8(model, ours.state, ours.info)
            theirs.kernels = False
            runners["ours int8 (static, PyTorch's kernels)"] = theirs
        if seed == 0:
            runners["ours int8-dynamic (no calibration)"] = optimize(model, dtype="int8", mode="eager")
        dev = torch.device("cpu")
        for peer, candidates in (("onnxruntime", ort_candidates), ("openvino", openvino_candidates)):
            for label, precision, build in candidates(model, dev, shape, calib):
                if precision == "int8" or (precision == "fp32" and seed == 0):
                    try:
                        runners[f"{peer} {label}"] = build()[0]
                    except Exception as e:  # noqa: BLE001 - a missing engine is a row, not a stop
                        runners[f"{peer} {label}"] = e
        for name, run in runners.items():
            row = evaluate(name, run)
            if seed == 0:
                results[name] = row
            if "int8" in name and "dynamic" not in name and "error" not in row:
                draws.setdefault(name, []).append({"seed": seed, **row})
    summary = {name: {"mean_top1": sum(r["top1"] for r in rows) / len(rows),
                      "top1_per_seed": [r["top1"] for r in rows],
                      "mean_logits_rel_error": sum(r["logits_rel_error"] for r in rows) / len(rows)}
               for name, rows in draws.items()}
    if args.seeds > 1:
        for name, row in summary.items():
            print(f"{name:<50} mean top-1 over {args.seeds} draws {row['mean_top1']:.2f}% "
                  f"({', '.join(f'{t:.2f}' for t in row['top1_per_seed'])}), mean logits error "
                  f"{row['mean_logits_rel_error']:.2e}", flush=True)
    report = {"weights": args.weights, "held_out_images": len(val), "calibration_images": args.images,
              "calibration": "seeded draw from the digits training split, eval preprocessing; 'results' "
                             "from seed 0, 'draws' from seeds 0 .. seeds-1",
              "seeds": args.seeds, "image_size": pre.image_size, "torch": torch.__version__,
              "results": results, "draws": draws, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
