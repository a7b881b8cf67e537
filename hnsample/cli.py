"""The ``hnsample`` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; register it in COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help)
COMMANDS = [
    ("demo", "hnsample.demo", "mine hard negatives on a synthetic corpus and show what each filter did"),
    ("bench", "hnsample.bench", "time hnsample against plain torch on this machine"),
    ("mine", "hnsample.mining_cli", "mine hard negatives for .npy embeddings or from a reranker's candidate scores "
                                    "(resumable; writes sentence-transformers datasets from texts)"),
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnsample", description="Exact, memory-flat hard-negative mining.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
