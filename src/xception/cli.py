"""The ``xception`` command line: thin subcommands over the library.

Each subcommand is an ``add_<name>(subparsers)`` function that declares its arguments and sets
``func``; the ``func`` returns the process exit code. User mistakes (``ValueError``, ``OSError``)
become one line on stderr and exit code 2 (1 for a partial failure that the command reports).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .registry import list_models


def cmd_models(args: argparse.Namespace) -> int:
    for name in list_models():
        print(name)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names create_model accepts")
    p.set_defaults(func=cmd_models)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import format_table, run_bench

    report = run_bench(model_name=args.model, device=args.device, batch_size=args.batch_size,
                       image_size=args.image_size, dtypes=_csv(args.dtype),
                       modes=_csv(args.modes) if args.modes else None,
                       compare=_csv(args.compare) if args.compare is not None else None,
                       cuda_graphs=args.cuda_graphs, warmup=args.warmup, repeats=args.repeats,
                       min_round_s=args.min_round_s, threads=args.threads)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="images/s and latency of our inference paths vs timm / ONNX Runtime")
    p.add_argument("--model", default="xception", help="model name (default: xception)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--dtype", default="bf16", help="our dtype(s), comma-separated: fp32,bf16,fp16 (default: bf16)")
    p.add_argument("--modes", default=None, help="our modes, comma-separated: eager,compile,fused (default: all)")
    p.add_argument("--compare", default=None, help="peers, comma-separated: timm,onnxruntime (default: both; '' none)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time CUDA-graph replays (default: on CUDA at batch <= 8)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per candidate")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-round-s", type=float, default=1.0, help="seconds each candidate runs per round")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every candidate (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_model
    from .registry import create_model

    if not Path(args.out).resolve().parent.is_dir():  # fail before loading anything
        raise FileNotFoundError(f"output folder {str(Path(args.out).parent)!r} does not exist")
    if args.checkpoint is None:
        logging.getLogger(__name__).warning("no --checkpoint: exporting randomly initialised weights")
        model = create_model(args.model)
    else:
        model = create_model(args.model, pretrained=args.checkpoint)
    report = export_model(model, args.format, args.out, image_size=args.image_size, check=args.check)
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.errors.items())
    print(f"wrote {report.path} ({report.format})" + (f"; relative error vs PyTorch fp32: {errors}" if errors else ""))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="export to ONNX / TorchScript / exported program, with a parity check")
    p.add_argument("--checkpoint", default=None, help="weights: a checkpoint, .safetensors, .h5 or .pth file")
    p.add_argument("--model", default="xception", help="model name (default: xception)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--image-size", type=int, default=299, help="side of the tracing input (batch stays dynamic)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run batch 1 and 3 through the file and compare with PyTorch (default: on)")
    p.add_argument("out", help="output file")
    p.set_defaults(func=cmd_export)


SUBCOMMANDS = [add_models]
SUBCOMMANDS += [add_bench, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    except (ValueError, OSError) as e:
        print(f"xception {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
