"""``vidattn bench train``: seconds per LoRA training step and peak memory, dense vs Radial, at 1x and 4x the
model's default frame count (``vidattn.lora.bench``, imported when the command runs).

Registered under ``vidattn bench`` by ``vidattn/commands/bench.py``: ``register(what)``."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

PROG = "bench train"
METHODS = ("dense", "radial")


def register(what: argparse._SubParsersAction) -> None:
    """Adds ``train`` to ``vidattn bench``'s sub-commands."""
    p = what.add_parser("train", help="LoRA training step time and peak memory, dense vs radial, at 1x and 4x frames",
                        description="Times the LoRA trainer's step (flow-matching loss, backward through the "
                                    "attention, AdamW) on random latents of each clip size, dense vs radial, each "
                                    "case in a fresh process; prints seconds per step, the speedup against dense at "
                                    "the same frame count and the peak memory (CUDA allocator peak, or the process's "
                                    "peak RSS on CPU).")
    p.add_argument("--model", default="tiny-bench", help="tiny, tiny-bench (default) or a Wan diffusers folder / hub id")
    p.add_argument("--frame-scales", default="1,4", help="comma list of frame multipliers of the model's default "
                                                         "count: frames = (default - 1) * scale + 1 (default 1,4)")
    p.add_argument("--height", type=int, default=None, help="clip height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="clip width in pixels (default: the model's)")
    p.add_argument("--methods", default="dense,radial", help="comma list of: dense, radial")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--block-size", type=int, default=128, help="radial: block size in tokens")
    p.add_argument("--decay", type=float, default=1.0, help="radial: band decay factor (> 0)")
    p.add_argument("--dense-layers", type=int, default=0,
                   help="radial: first N blocks dense (default 0: the tiny models have only 2 blocks)")
    p.add_argument("--backend", default="auto", help="sparse kernel backend (auto: torch on CPU, triton on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="run the cases in this process (faster start; peak memory is then the run's so far)")
    p.add_argument("--append", default=None, metavar="FILE", help="append the table to this markdown file")
    p.set_defaults(func=run)


def _ints(text: str, option: str) -> list[int]:
    from vidattn.validation import UsageError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(option, f"must be a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(option, f"must be a comma list of positive integers, got {text!r}")
    return values


def _check(args: argparse.Namespace) -> dict:
    """Every value checked before any work (UsageError naming the option); returns the cases' settings."""
    from vidattn import validation as v

    scales = _ints(args.frame_scales, "--frame-scales")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise v.UsageError("--methods", f"must be a comma list of {', '.join(METHODS)}, got {args.methods!r}")
    for method in methods:
        v.check_choice("--methods", method, METHODS)
    for option, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--rank", args.rank, 1),
                               ("--block-size", args.block_size, 1), ("--dense-layers", args.dense_layers, 0)):
        v.check_number(option, value, minimum=low, integer=True)
    v.check_number("--decay", args.decay, minimum=0, low_open=True)
    v.check_seed("--seed", args.seed)
    device = v.check_device(args.device)
    v.check_backend(args.backend, device)
    spec = v.check_model(args.model)
    if spec.family != "wan":
        raise v.UsageError("--model", f"{v.shown(args.model)} is a {spec.class_name}; bench train runs Wan models")
    base = v.resolve_settings(spec, {"height": args.height, "width": args.width})
    for scale in scales:
        v.check_geometry((base["frames"] - 1) * scale + 1, base["height"], base["width"], spec.factors,
                         model=f"{spec.name} ({spec.class_name})")
    if args.append is not None:
        v.check_output_file(args.append, "--append", suffix=".md", overwrite=True)
    return {"scales": scales, "methods": methods, "device": device, "base": base}


def run(args: argparse.Namespace) -> int:
    from vidattn.lora.bench import TrainCase, run_cases, table_lines

    checked = _check(args)
    base = checked["base"]
    cases = [TrainCase(model=args.model, method=method, scale=scale, frames=(base["frames"] - 1) * scale + 1,
                       height=base["height"], width=base["width"], steps=args.steps, warmup=args.warmup,
                       rank=args.rank, block_size=args.block_size, decay=args.decay,
                       dense_layers=args.dense_layers, backend=args.backend, device=checked["device"],
                       seed=args.seed)
             for scale in checked["scales"] for method in checked["methods"]]
    lines = table_lines([])
    print("\n".join(lines), flush=True)
    results = run_cases(cases, isolate=not args.in_process,
                        progress=lambda r: print(table_lines([r])[-1], file=sys.stderr, flush=True))
    lines = table_lines(results)
    print("\n".join(lines[2:]))
    if args.append:
        _append(Path(args.append), lines, args, checked["device"])
    return 0


def _append(path: Path, lines: list[str], args: argparse.Namespace, device: str) -> None:
    import torch

    from vidattn.bench import cpu_name

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()
    command = " ".join(["vidattn", *(shlex.quote(a) for a in getattr(args, "argv", []))])
    header = ["", f"### train, LoRA step dense vs radial, {datetime.date.today().isoformat()}", "",
              f"Command: `{command}`  ",
              f"Machine: {name} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads  ",
              f"Model {args.model}, LoRA rank {args.rank}, radial block {args.block_size}, decay {args.decay:g}, "
              f"{args.dense_layers} dense blocks; median of {args.steps} steps after {args.warmup} warm-up, each case "
              f"in {'this process' if args.in_process else 'a fresh process'}. Density: share of attention computed "
              "over all layers.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(header + lines) + "\n")
