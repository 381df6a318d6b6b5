"""The ``xception`` command line: thin subcommands over the library.

Each subcommand is an ``add_<name>(subparsers)`` function that declares its arguments and sets
``func``; the ``func`` returns the process exit code. User mistakes (``ValueError``, ``OSError``)
become one line on stderr and exit code 2 (1 for a partial failure that the command reports).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .extras import MissingExtra
from .models.registry import list_models


def cmd_models(args: argparse.Namespace) -> int:
    for name in list_models():
        print(name)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names create_model accepts")
    p.set_defaults(func=cmd_models)


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import load_pretrained, save_safetensors

    model = load_pretrained(args.model, args.src)
    save_safetensors(model, args.dst)
    print(f"{args.dst}: {model.model_name}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_classes} classes")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert Keras .h5 / timm .pth / checkpoint weights to .safetensors")
    p.add_argument("src", help='weights file, or "keras", "keras_notop", "timm" to download the public ones')
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", default=None, help="model name (default: the one the file records, else xception)")
    p.set_defaults(func=cmd_convert)


def _kv(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``middle_blocks=0``, ``residual=false``)."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_weights(p: argparse.ArgumentParser, *, required: bool = True, preprocessing: bool = True,
                 images: bool = False) -> None:
    """``--weights`` (alias ``--checkpoint``), the preprocessing flags that override the weights', the images."""
    if images:
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--weights", "--checkpoint", dest="weights", required=required, metavar="W",
                   help='"keras", "keras_notop", "timm" (downloaded once), a .h5 / .pth / .safetensors file or a '
                        "training checkpoint (last.pt / best.pt); --checkpoint is the same option")
    if preprocessing:
        p.add_argument("--image-size", type=int, help="input side (default: the weights' preprocessing)")
        p.add_argument("--crop-pct", type=float, help="resize to size/crop_pct, centre-crop (default: the weights')")


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .training.engine import NonFiniteLossError
    from .training.recipes import TrainConfig
    from .training.trainer import TrainingInterrupted, fit

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    options["model_kwargs"] = dict(options["model_kwargs"] or [])
    try:
        summary = fit(TrainConfig(**options))
    except TrainingInterrupted as e:
        print(f"xception train: {e}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"xception train: error: {e}", file=sys.stderr)
        return 1
    if summary["last"] is not None and _is_rank0():
        last = summary["last"]
        print(f"done: {summary['epochs']} epochs, val top-1 {100 * last['val_top1']:.2f}% (best "
              f"{100 * summary['best_val_top1']:.2f}%), checkpoints in {summary['run_dir']}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune on digits, a folder of images or shards (torchrun-ready)")
    p.add_argument("--data", required=True,
                   help="'digits', a folder: DATA/{train,val}/<class>/* or DATA/<class>/*, or WebDataset shards: "
                        "a brace pattern 'shards/train-{000000..000099}.tar' or a list file (paths or pipe: commands)")
    p.add_argument("--val-data", help="validation data of a shard run: shards (pattern or list file) or a class-folder tree")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--model", default="xception")
    p.add_argument("--model-kwargs", nargs="+", type=_kv, metavar="KEY=VALUE", help="model config, e.g. middle_blocks=4")
    p.add_argument("--pretrained", help="'keras', 'timm' or a weights file to start from")
    p.add_argument("--recipe", choices=["paper", "finetune"], default="finetune",
                   help="paper: SGD 0.045 x0.94/2 epochs, dropout 0.5, EMA; finetune: AdamW + cosine (default)")
    for name, kind in [("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
                       ("drop-rate", float), ("ema-decay", float), ("label-smoothing", float),
                       ("warmup-epochs", float), ("max-grad-norm", float)]:
        p.add_argument(f"--{name}", type=kind, help="default: the recipe's" if name != "max-grad-norm" else "clip")
    p.add_argument("--image-size", type=int, help="input side (default: the pretrained weights', else 299)")
    p.add_argument("--train-scale", type=float, help="smallest area fraction of the random-resized crop")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    p.add_argument("--crop-pct", type=float,
                   help="evaluation: resize to size/crop_pct, centre-crop (default: the weights', else 0.875)")
    p.add_argument("--val-split", type=float, help="hold out this fraction when DATA has no train/val folders")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation: batches per optimizer step")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per rank")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue a run from OUT/last.pt (or CKPT); 'auto': from OUT/last.pt if it exists, else "
                        "start the run (for retry loops)")
    p.add_argument("--save-interval", metavar="N{min,steps}",
                   help="also save OUT/last.pt inside an epoch every N minutes (10min) or N optimizer steps (500steps)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help='TensorBoard events in OUT/tensorboard (default: when pip install "xception[tensorboard]" is done)')
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .inference.evaluate import evaluate_checkpoint
    from .plotting import plot_confusion

    r = evaluate_checkpoint(args.weights, args.data, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, val_split=args.val_split, amp=args.amp, image_size=args.image_size,
                            crop_pct=args.crop_pct, report=args.report, cam_layer=args.layer)
    if not _is_rank0():
        return 0
    if args.plot:
        plot_confusion(r["confusion"], r["class_names"], args.plot)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['count']} images: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  loss {r['loss']:.4f}")
        for name, acc in r["per_class"].items():
            print(f"  {name}: " + ("-" if acc is None else f"{100 * acc:.2f}%"))
        if r["skipped"]:
            print(f"{r['skipped']} unreadable images skipped", file=sys.stderr)
        if args.report:
            print(f"report: {r['report']['markdown']} (+ per_class.csv, confusion_matrix.png, mistakes.png)")
    return 1 if r["skipped"] else 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5/loss/per-class accuracy of a checkpoint on held-out data")
    _add_weights(p)
    p.add_argument("--data", required=True,
                   help="'digits' (its val split), DATA/val, DATA/<class>/*, or shards (pattern or list file)")
    p.add_argument("--val-split", type=float, help="evaluate the held-out fraction of a train run's --val-split")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", nargs="?", const="confusion_matrix.png", metavar="PNG", help="write a confusion matrix")
    p.add_argument("--report", metavar="DIR", help="write confusion_matrix.png, per_class.csv/.md (precision, "
                   'recall, F1) and mistakes.png (most confident mistakes + Grad-CAM)')
    p.add_argument("--layer", help="--report: the layer of the Grad-CAM maps (default: the last feature map)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.set_defaults(func=cmd_eval)


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .inference.predict import predict

    failures = 0
    for row in predict(args.weights, args.images, topk=args.topk, device=args.device, batch_size=args.batch_size,
                       workers=args.workers, amp=args.amp, image_size=args.image_size, crop_pct=args.crop_pct):
        if "error" in row:
            failures += 1
            print(f"xception predict: error: {row['path']}: {row['error']}", file=sys.stderr)
            if not args.json:
                continue
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in row["top"])
            print(f"{row['path']}: {tops}", flush=True)
    return 1 if failures else 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (files, folders, globs) with any weights")
    _add_weights(p, images=True)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.set_defaults(func=cmd_predict)


def cmd_shard(args: argparse.Namespace) -> int:
    from .data.shards import write_shards

    report = write_shards(args.src, args.out, shard_size=args.shard_size, val_split=args.val_split)
    for split, part in report["splits"].items():
        print(f"{split}: {part['images']} images in {len(part['shards'])} shards, list {report['out']}/{split}.txt")
    print(f"{len(report['classes'])} classes and the sample counts in {report['out']}/shards.json")
    return 0


def add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="write a class-folder tree as WebDataset tar shards (for streaming)")
    p.add_argument("src", help="DIR/{train,val}/<class>/* or DIR/<class>/*")
    p.add_argument("out", help="output folder: SPLIT-000000.tar ..., SPLIT.txt, shards.json")
    p.add_argument("--shard-size", type=int, required=True, help="images per shard (e.g. 1000: ~110 MB of ImageNet)")
    p.add_argument("--val-split", type=float, help="hold out this fraction of DIR/<class>/* as train does")
    p.set_defaults(func=cmd_shard)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summary_markdown

    overrides = {"epochs": args.epochs} if args.epochs else {}
    summary = run_demo(args.out, device=args.device, **overrides)
    print(summary_markdown(summary))
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train Xception on scikit-learn's digits, evaluate, predict, summarise")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, help="override the demo's epoch count")
    p.set_defaults(func=cmd_demo)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from .bench import format_table, run_bench

    # stdout carries the report alone: what the peers print while building (NNCF's progress bars,
    # exporters) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        report = _bench(args, run_bench)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def _bench(args: argparse.Namespace, run_bench) -> dict:
    return run_bench(model_name=args.model, weights=args.weights, device=args.device, batch_size=args.batch_size,
                     image_size=args.image_size, dtypes=_csv(args.dtype) if args.dtype else None,
                     modes=_csv(args.modes) if args.modes else None,
                     compare=_csv(args.compare) if args.compare is not None else None,
                     cuda_graphs=args.cuda_graphs, warmup=args.warmup, repeats=args.repeats,
                     min_round_s=args.min_round_s, threads=args.threads, calibration=args.calibration,
                     compile_peers=args.compile_peers)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="images/s and latency of our inference paths vs timm / ONNX Runtime")
    p.add_argument("--model", default=None, help="model name (default: the weights', else xception)")
    _add_weights(p, required=False, preprocessing=False)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None,
                   help="input side (default: the weights' preprocessing, else 299; no --weights: random weights)")
    p.add_argument("--dtype", default=None,
                   help="our precision(s), comma-separated: fp32,bf16,fp16,int8,int8-dynamic (int8: static, "
                        "calibrated on the same images as the int8 peers, or the --weights file's own calibration; "
                        "int8-dynamic: int8 1x1 convs, bf16 elsewhere, no calibration; both CPU only) (default on "
                        "cpu: bf16 where native else fp32, int8, and int8-dynamic on CPUs with VNNI/AMX; cuda: bf16)")
    p.add_argument("--modes", default=None, help="our modes, comma-separated: eager,compile (default: both)")
    p.add_argument("--compare", default=None,
                   help="peers, comma-separated: timm,onnxruntime,openvino (default: all; '' none)")
    p.add_argument("--calibration", type=int, default=16,
                   help="images (seeded random) our static int8 and the int8 peers are calibrated on")
    p.add_argument("--compile-peers", action=argparse.BooleanOptionalAction, default=True,
                   help="include timm under torch.compile (minutes of compiling on a small CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time CUDA-graph replays (default: on CUDA at batch <= 8)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per candidate")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-round-s", type=float, default=1.0, help="seconds each candidate runs per round")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every candidate (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy.int8.calibrate import quantize_weights

    if not Path(args.out).resolve().parent.is_dir():  # fail before any work
        raise FileNotFoundError(f"output folder {str(Path(args.out).parent)!r} does not exist")
    q = quantize_weights(args.weights, args.calibrate, args.out, images=args.images, batch_size=args.batch_size,
                         seed=args.seed, val_split=args.val_split, image_size=args.image_size,
                         crop_pct=args.crop_pct, progress=_is_rank0())
    print(f"wrote {args.out}: static int8 ({q.info['engine']}), calibrated on {q.info['images']} images of "
          f"{args.calibrate}")
    return 0


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="static int8 for the CPU: calibrate on your images, write a .safetensors "
                                        "that predict / eval / bench / export run in int8")
    _add_weights(p)
    p.add_argument("--calibrate", required=True, metavar="DATA",
                   help="'digits', a folder with train/ (its images), or a class folder")
    p.add_argument("--out", required=True, help="the .safetensors to write (fp32 weights + calibration)")
    p.add_argument("--images", type=int, default=128, help="calibration images (a seeded random draw)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--val-split", type=float, default=None,
                   help="for a class folder without train/: calibrate on the other 1-F only")
    p.set_defaults(func=cmd_quantize)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .factory import create_model
    from .deploy.export import export_model
    from .weights import load_pretrained

    if not Path(args.out).resolve().parent.is_dir():  # fail before loading anything
        raise FileNotFoundError(f"output folder {str(Path(args.out).parent)!r} does not exist")
    if args.weights is None:
        logging.getLogger(__name__).warning("no --weights: exporting randomly initialised weights")
        model = create_model(args.model or "xception")
    else:
        model = load_pretrained(args.model, args.weights)
    report = export_model(model, args.format, args.out, image_size=args.image_size, check=args.check)
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.errors.items())
    against = "int8" if getattr(model, "int8_calibration", None) is not None else "fp32"
    print(f"wrote {report.path} ({report.format})"
          + (f"; relative error vs PyTorch {against}: {errors}" if errors else ""))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    from .deploy.export import FORMATS

    p = sub.add_parser("export", help="export to ONNX / TorchScript / exported program, with a parity check")
    _add_weights(p, required=False, preprocessing=False)
    p.add_argument("--model", default=None, help="model name (default: the one the weights record, else xception)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the tracing input (default: the weights' preprocessing; the batch stays dynamic)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run batch 1 and 3 through the file and compare with PyTorch (default: on)")
    p.add_argument("out", help="output file")
    p.set_defaults(func=cmd_export)


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.images import expand_inputs, read_image
    from .inference.classify import Classifier, class_index
    from .inference.explain import FEATURES, check_methods

    # an unknown method or class: named before any work
    methods = check_methods(_csv(args.methods))
    clf = Classifier(args.weights, device=args.device, image_size=args.image_size, crop_pct=args.crop_pct)
    targets = [class_index(c, clf.class_names) for c in args.target] if args.target else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    failures = 0
    for path, error in expand_inputs(args.images):
        try:
            if error is not None:
                raise FileNotFoundError(f"{path}: {error}")
            image = read_image(path)
        except (OSError, ValueError) as e:
            failures += 1
            print(f"xception explain: error: {e}", file=sys.stderr)
            continue
        explanation = clf.explain(image, targets, topk=args.topk, methods=methods, layer=args.layer)
        dst, n = out / f"{path.stem}_explain.png", 1
        while dst in written:  # two inputs with one name: photo_explain.png, photo_explain_2.png
            n += 1
            dst = out / f"{path.stem}_explain_{n}.png"
        written.add(dst)
        explanation.save(dst, title=f"{path.name}: {clf.model.model_name}, layer {args.layer or FEATURES}")
        tops = ", ".join(f"{t.label} {t.prob:.3f}" for t in explanation.targets)
        print(f"{path}: {dst} ({tops})", flush=True)
    return 1 if failures else 0


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM and Grad-CAM++ heatmaps of images, one PNG each")
    _add_weights(p, images=True)
    p.add_argument("--out", default="explain_out", help="output folder (default: explain_out)")
    p.add_argument("--topk", type=int, default=3, help="explain the K most probable classes (default: 3)")
    p.add_argument("--class", dest="target", action="append", metavar="NAME",
                   help='explain this class instead (name or index; repeatable), e.g. --class "golden retriever"')
    p.add_argument("--methods", default="gradcam,gradcam++",
                   help="comma-separated: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam")
    p.add_argument("--layer", default=None,
                   help="submodule to take the maps at, e.g. block11 (default: the last feature map)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_explain)


def cmd_app(args: argparse.Namespace) -> int:
    from .app import launch

    launch(args.weights, host=args.host, port=args.port, device=args.device)
    return 0


def add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a web page (Gradio) to classify a photo: top-5 classes and Grad-CAM overlay")
    _add_weights(p, preprocessing=False)
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_app)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .extras import require

    for module in ("starlette", "uvicorn", "prometheus_client", "multipart"):
        require(module, "serve", "xception serve")
    from .inference.classify import load_model
    from .runtime import resolve_device
    from .serve import ServeConfig, Service

    load_model(args.weights, device="cpu", int8=False)  # a bad file is named here, before any worker starts
    config = ServeConfig(weights=args.weights, device=str(resolve_device(args.device)), workers=args.workers,
                         max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                         max_queue=args.max_queue, max_body_mb=args.max_body_mb, timeout_s=args.timeout,
                         api_key=args.api_key or os.environ.get("XCEPTION_API_KEY") or None, compile=args.compile,
                         threads=args.threads, streams=args.streams, image_size=args.image_size,
                         crop_pct=args.crop_pct)
    print(f"xception serve: loading {args.weights} in {args.workers} worker(s) for http://{args.host}:{args.port}",
          flush=True)
    Service(config).run(args.host, args.port, grace=args.grace)
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an HTTP inference service with dynamic batching (POST /predict, /health, "
                                     "/metrics)")
    _add_weights(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=1, help="inference processes, each holding the model")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 503 at once")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (413 over it)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request is answered 504")
    p.add_argument("--api-key", default=None, help="require this key (default: $XCEPTION_API_KEY; none: open)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--streams", type=int, default=None,
                   help="CPU: run the images of a batch on this many threads of a worker side by side, each with "
                        "threads / streams intra-op threads (default: one per thread; 1: the whole batch on "
                        "every thread)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    p.set_defaults(func=cmd_serve)


def cmd_summary(args: argparse.Namespace) -> int:
    from .inference.summary import model_summary

    print(model_summary(args.model, image_size=args.image_size, weights=args.weights, depth=args.depth))
    return 0


def add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="layer table: output shapes and parameters (like Keras's model.summary())")
    p.add_argument("--model", default=None, help="model name (default: the weights', else xception)")
    _add_weights(p, required=False, preprocessing=False)
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the weights', else 299)")
    p.add_argument("--depth", type=int, default=4, help="levels of nested modules shown (default: 4)")
    p.set_defaults(func=cmd_summary)



def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def cmd_segment_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .segmentation.train import SegmentTrainConfig, fit
    from .training.engine import NonFiniteLossError
    from .training.trainer import TrainingInterrupted

    fields = {f.name for f in dataclasses.fields(SegmentTrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "scale_range" in options:
        options["scale_range"] = tuple(options["scale_range"])
    options["encoder_options"] = dict(options.get("encoder_options") or [])
    try:
        summary = fit(SegmentTrainConfig(**options))
    except TrainingInterrupted as e:
        print(f"xception segment train: {e}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        print(f"xception segment train: error: {e}", file=sys.stderr)
        return 1
    if summary["last"] is not None and _is_rank0():
        print(f"done: {summary['epochs']} epochs, val mIoU {100 * summary['last']['val_miou']:.2f}% (best "
              f"{100 * summary['best_val_miou']:.2f}%), checkpoints in {summary['run_dir']}")
    return 0


def cmd_segment_eval(args: argparse.Namespace) -> int:
    import json

    from .segmentation.report import evaluate_split

    result = evaluate_split(args.weights, args.data, split=args.split, output_stride=args.output_stride,
                            scales=args.scales, flip=args.flip, device=args.device, report=args.report,
                            progress=args.progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"mIoU {100 * result['miou']:.2f}%  pixel accuracy {100 * result['pixel_accuracy']:.2f}%  "
              f"({result['images']} images, output stride {result['output_stride']}, scales {result['scales']}"
              f"{', flip' if result['flip'] else ''})")
        for name, iou in result["iou"].items():
            print(f"  {name:>20}  {'-' if iou is None else f'{100 * iou:.2f}%'}")
    return 0


def cmd_segment_predict(args: argparse.Namespace) -> int:
    from .runtime import resolve_device
    from .segmentation.predict import predict_masks
    from .segmentation.weights import load_deeplab

    model = load_deeplab(args.weights, **({"output_stride": args.output_stride} if args.output_stride else {}))
    results = predict_masks(model, args.images, args.out, scales=args.scales, flip=args.flip,
                            device=resolve_device(args.device), overlay=args.overlay)
    failed = 0
    for r in results:
        if r.error is not None:
            failed += 1
            print(f"{r.path}: error: {r.error}", file=sys.stderr)
        else:
            top = sorted(r.class_pixels.items(), key=lambda kv: -kv[1])[:3]
            print(f"{r.path} -> {r.mask}  ({', '.join(f'{k} {v}' for k, v in top)} pixels)")
    return 1 if failed else 0


def cmd_segment_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .segmentation.predict import export_onnx
    from .segmentation.weights import load_deeplab

    if not Path(args.out).resolve().parent.is_dir():
        raise FileNotFoundError(f"output folder {str(Path(args.out).parent)!r} does not exist")
    model = load_deeplab(args.weights, **({"output_stride": args.output_stride} if args.output_stride else {}))
    report = export_onnx(model, args.out, check=args.check)
    errors = ", ".join(f"{size}: {e:.1e}" for size, e in report.errors.items())
    print(f"wrote {report.path} (onnx, dynamic height and width)"
          + (f"; relative error vs PyTorch: {errors}" if errors else ""))
    return 0


def cmd_segment_convert(args: argparse.Namespace) -> int:
    from .segmentation.weights import load_deeplab, save_deeplab

    model = load_deeplab(args.src, **({"backbone": args.backbone} if args.backbone else {}))
    names = [n.strip() for n in open(args.class_names).read().splitlines() if n.strip()] if args.class_names else None
    save_deeplab(model, args.dst, class_names=names)
    print(f"{args.dst}: DeepLabv3+ {model.config.backbone}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {model.num_classes} classes")
    return 0


def add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="DeepLabv3+ semantic segmentation: train, eval (mIoU), predict, export, convert")
    seg = p.add_subparsers(dest="segment_command", required=True, metavar="ACTION")

    t = seg.add_parser("train", help="train DeepLabv3+ (the paper's recipe by default; torchrun-ready)")
    t.add_argument("--data", required=True, help="a VOC tree or DATA/{train,val}/{images,masks}")
    t.add_argument("--out", required=True, help="run directory (last.pt, best.pt, metrics.jsonl)")
    t.add_argument("--backbone", default="xception65", choices=list_models())
    t.add_argument("--encoder-weights", help="ImageNet weights of the backbone (.h5 / .pth / .safetensors)")
    t.add_argument("--encoder-options", nargs="+", type=_kv, metavar="KEY=VALUE",
                   help="backbone config, e.g. middle_blocks=4")
    t.add_argument("--num-classes", type=int, help="default: the data's class names")
    for name, kind in [("epochs", int), ("batch-size", int), ("lr", float), ("poly-power", float),
                       ("weight-decay", float), ("crop-size", int), ("output-stride", int), ("seed", int),
                       ("workers", int)]:
        t.add_argument(f"--{name}", type=kind, help="default: the paper's")
    t.add_argument("--scale-range", type=_floats, metavar="MIN,MAX", help="random scale (default 0.5,2.0)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder blocks (less memory)")
    t.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None, help="SyncBN under torchrun")
    t.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"])
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from OUT/last.pt (or CKPT); 'auto': if it exists, else start the run")
    t.add_argument("--save-interval", metavar="N{min,steps}", help="also save OUT/last.pt inside an epoch")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    t.set_defaults(func=cmd_segment_train)

    e = seg.add_parser("eval", help="mIoU, per-class IoU and pixel accuracy on a split")
    e.add_argument("--weights", required=True, help="DeepLabv3+ .safetensors, a segment train checkpoint, or a "
                   "TensorFlow DeepLab model.ckpt")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="val")
    e.add_argument("--output-stride", type=int, choices=[8, 16])
    e.add_argument("--scales", type=_floats, default=[1.0], metavar="S1,S2,...", help="e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    e.add_argument("--flip", action="store_true", help="also the mirrored images")
    e.add_argument("--json", action="store_true")
    e.add_argument("--report", metavar="DIR", help="write the per-class table and a gallery of the worst images")
    e.add_argument("--device", default="auto")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    e.set_defaults(func=cmd_segment_eval)

    r = seg.add_parser("predict", help="palette PNG masks and overlays of images")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    r.add_argument("--weights", required=True)
    r.add_argument("--out", required=True, help="folder for <stem>.png masks and <stem>_overlay.jpg")
    r.add_argument("--output-stride", type=int, choices=[8, 16])
    r.add_argument("--scales", type=_floats, default=[1.0], metavar="S1,S2,...")
    r.add_argument("--flip", action="store_true")
    r.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_segment_predict)

    x = seg.add_parser("export", help="ONNX with dynamic batch, height and width, checked against PyTorch")
    x.add_argument("--weights", required=True)
    x.add_argument("--output-stride", type=int, choices=[8, 16])
    x.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    x.add_argument("out", help="output .onnx file")
    x.set_defaults(func=cmd_segment_export)

    c = seg.add_parser("convert", help="a TensorFlow DeepLab checkpoint (or ours) to .safetensors")
    c.add_argument("src", help="model.ckpt prefix, its .index or its folder; or one of our files")
    c.add_argument("dst", help="output .safetensors")
    c.add_argument("--backbone", help="encoder of the checkpoint (default xception65)")
    c.add_argument("--class-names", metavar="FILE", help="one name a line (default: VOC's 21 or Cityscapes' 19)")
    c.set_defaults(func=cmd_segment_convert)


SUBCOMMANDS = [add_demo, add_train, add_eval, add_predict, add_explain, add_serve, add_shard, add_bench, add_quantize,
               add_export, add_convert, add_segment, add_models, add_summary, add_app]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xception", description="Xception (Chollet, CVPR 2017) in PyTorch: train, evaluate, classify, explain, "
        "quantize, export and benchmark.", epilog="Run 'xception COMMAND --help' for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("xception: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MissingExtra) as e:
        command = args.command + (f" {args.segment_command}" if getattr(args, "segment_command", None) else "")
        print(f"xception {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
