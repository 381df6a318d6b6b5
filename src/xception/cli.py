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


SUBCOMMANDS = [add_models, add_convert]


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
