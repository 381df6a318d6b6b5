"""Int8 accuracy on real data: top-1 on the 360 held-out digits of the demo's model, in fp32 and in
int8 for us and for each int8 peer (ONNX Runtime static QDQ, OpenVINO + NNCF), all calibrated on
the same training images. Each path's logits are also compared with our fp32 logits (relative L2
error over the 360 images), and the misclassified images are listed by index.

    xception demo --out demo_out                      # trains the digits model (demo_out/run/best.pt)
    PYTHONPATH=src python benchmarks/int8_accuracy.py demo_out/run/best.pt --images 128 \
        --json benchmarks/int8_accuracy_digits.json

The calibration images are a seeded draw from the digits' training split (never the held-out
ones), preprocessed like evaluation; every int8 path gets exactly these tensors.
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
from xception.inference.optimize import optimize  # noqa: E402
from xception.inference.peers import openvino_candidates, ort_candidates  # noqa: E402
from xception.inference.calibrate import calibration_set  # noqa: E402
from xception.inference.quantize import StaticInt8, calibrate_static  # noqa: E402
from xception.training.data import DigitsDataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="the digits model (a training checkpoint or .safetensors)")
    ap.add_argument("--images", type=int, default=128, help="calibration images from the training split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.weights, device="cpu", int8=False)
    pre = model.preprocessing
    calib = [x[None] for x, _ in calibration_set("digits", pre, args.images, seed=0)]
    val = DigitsDataset("val", pre.eval_transform())
    shape = (1, *calib[0].shape[1:])

    runners = {"ours fp32": lambda x: model(x)}
    start = time.perf_counter()
    ours = calibrate_static(model, calib, info={"calibration_data": "digits train split"})
    runners["ours int8 (static)"] = ours
    print(f"ours int8 calibrated in {time.perf_counter() - start:.1f} s; our kernels: {ours.uses_cpu_kernels}",
          flush=True)
    if ours.uses_cpu_kernels:  # the same calibration on PyTorch's quantized kernels (8-bit 1x1 weights)
        theirs = StaticInt8(model, ours.state, ours.info)
        theirs.kernels = False
        runners["ours int8 (static, PyTorch's kernels)"] = theirs
    runners["ours int8-dynamic (no calibration)"] = optimize(model, dtype="int8", mode="eager")
    dev = torch.device("cpu")
    for peer, candidates in (("onnxruntime", ort_candidates), ("openvino", openvino_candidates)):
        for label, precision, build in candidates(model, dev, shape, calib):
            if precision in ("int8", "fp32"):
                try:
                    runners[f"{peer} {label}"] = build()[0]
                except Exception as e:  # noqa: BLE001 - a missing engine is a row, not a stop
                    runners[f"{peer} {label}"] = e

    results = {}
    reference = None  # our fp32 logits: every other path's relative L2 error is against them
    for name, run in runners.items():
        if isinstance(run, Exception):
            results[name] = {"error": f"{type(run).__name__}: {run}"}
            continue
        with torch.no_grad():
            logits = torch.cat([run(x[None]).float() for x, _ in val])
        labels = torch.tensor([y for _, y in val])
        reference = logits if reference is None else reference
        correct = int((logits.argmax(1) == labels).sum())
        wrong = (logits.argmax(1) != labels).nonzero().flatten().tolist()
        results[name] = {"top1": 100.0 * correct / len(val), "correct": correct, "wrong_images": wrong,
                         "logits_rel_error": float((logits - reference).norm() / reference.norm())}
        print(f"{name:<50} top-1 {results[name]['top1']:.2f}% ({correct}/{len(val)}), logits off fp32 by "
              f"{results[name]['logits_rel_error']:.2e}, wrong: {wrong}", flush=True)
    report = {"weights": args.weights, "held_out_images": len(val), "calibration_images": len(calib),
              "calibration": "seeded draw (seed 0) from the digits training split, eval preprocessing",
              "image_size": pre.image_size, "torch": torch.__version__, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
