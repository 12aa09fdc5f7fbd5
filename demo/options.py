"""The demo's command-line options (shared by ``vidattn demo`` and ``python -m vidattn.demo``) and its launch."""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

__all__ = ["add_options", "launch", "main"]

DESCRIPTION = ("Start the Gradio demo: generate a video with any registered attention method, compare it with dense "
               "attention from the same seed (speedup, PSNR/SSIM, difference heat-map) and see the block mask and "
               "density per layer. One generation runs at a time per device; others wait in the queue.")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of the demo command."""
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 serves the local network)")
    parser.add_argument("--server-port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--model", default="tiny",
                        help="model the form starts with: 'tiny' (offline), a hub id or a local diffusers folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")


def _check(args: argparse.Namespace) -> str:
    """Checks before anything is loaded (UsageError naming the option); returns the device."""
    import importlib.util

    from vidattn import validation as v

    if importlib.util.find_spec("gradio") is None:
        raise v.UsageError(None, "the demo needs gradio: pip install 'vidattn[demo]'")
    v.check_number("--server-port", args.server_port, minimum=0, maximum=65535, integer=True)
    device = v.check_device(args.device)
    v.check_dtype(args.dtype, device)
    v.check_model(args.model)
    return device


def launch(args: argparse.Namespace, block: bool = True) -> Any:
    """Build the page and serve it; returns the Gradio ``Blocks`` (``block=False``: the server runs in a thread)."""
    device = _check(args)
    from .app import build_app

    from vidattn.validation import UsageError

    blocks = build_app(device=device, dtype=args.dtype, model=args.model)
    try:
        blocks.launch(server_name=args.server_name, server_port=args.server_port, share=args.share,
                      prevent_thread_lock=not block, ssr_mode=False)
    except OSError as err:  # the port is taken, or the address is not this machine's
        option = "--server-port" if args.server_port is not None else "--server-name"
        raise UsageError(option, f"cannot serve on {args.server_name or '127.0.0.1'}:{args.server_port or 7860} "
                                 f"({' '.join(str(err).split())}); choose a free port or a local address") from None
    return blocks


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vidattn.demo [options]``."""
    from vidattn.validation import UsageError, report

    parser = argparse.ArgumentParser(prog="python -m vidattn.demo", description=DESCRIPTION)
    add_options(parser)
    args = parser.parse_args(argv)
    try:
        launch(args)
    except UsageError as err:
        return report("demo", err)
    return 0
