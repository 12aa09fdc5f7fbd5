"""The ``vidattn`` command. Each sub-command lives in ``vidattn/commands/<name>.py`` and imports its heavy
dependencies inside ``run`` so that ``--help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ("generate", "bench", "mask", "presets", "train-lora", "demo")  # module: the name with "_" for "-"

# Packages whose versions ``--version`` prints after vidattn's, one line each.
VERSION_PACKAGES = ("torch", "diffusers", "triton")


def versions() -> list[tuple[str, str]]:
    """``[("vidattn", version), ("torch", ...), ("diffusers", ...), ("triton", ...)]``, read from the installed
    packages' metadata (nothing is imported); ``"not installed"`` for a missing one."""
    from importlib import metadata

    from . import __version__

    found = [("vidattn", __version__)]
    for name in VERSION_PACKAGES:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, "not installed"))
    return found


class _VersionAction(argparse.Action):
    """``--version``: the versions, one ``name version`` line each, then exit 0 (computed only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(f"{name} {version}" for name, version in versions()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidattn", description="Sparse attention for video diffusion transformers.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print 'vidattn VERSION', then the torch, diffusers and triton versions ('NAME VERSION' "
                             "or 'NAME not installed'), one per line, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vidattn.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from .validation import UsageError, command_name, report

    try:
        return int(args.func(args) or 0)
    except UsageError as err:  # a user error found by a command's checks: one line, exit code 2
        return report(command_name(args), err)


if __name__ == "__main__":
    sys.exit(main())
