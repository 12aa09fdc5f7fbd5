"""The ``vidattn`` command. Each sub-command lives in ``vidattn/commands/<name>.py`` and imports its heavy
dependencies inside ``run`` so that ``--help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ("generate", "bench", "mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidattn", description="Sparse attention for video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vidattn.commands.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
