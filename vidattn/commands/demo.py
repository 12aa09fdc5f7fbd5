"""``vidattn demo``: serve the Gradio demo (options declared in :mod:`vidattn.demo.options`)."""
from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    from vidattn.demo.options import DESCRIPTION, add_options

    parser = sub.add_parser("demo", help="start the Gradio demo (needs the demo extra)", description=DESCRIPTION)
    add_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A :class:`~vidattn.validation.UsageError` raised here is printed as one line by ``vidattn.cli.main``."""
    from vidattn.demo.options import launch

    launch(args)
    return 0
