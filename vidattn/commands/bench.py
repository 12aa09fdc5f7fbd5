"""``vidattn bench attention``: sparse backends vs dense SDPA on one layout, in one process, interleaved."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against dense attention",
                       description="Benchmarks; speed is reported as ratios against dense attention measured in "
                                   "the same run.")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    a = what.add_parser("attention", help="time sparse backends against dense SDPA on one token layout",
                        description="Times dense SDPA and the sparse backends on the same q, k, v (interleaved) and "
                                    "prints density, time, speedup and efficiency = speedup x density.")
    a.add_argument("--geometry", default=None, help="named latent grid: " + ", ".join(_geometries()))
    a.add_argument("--frames", type=int, default=None, help="latent frames (overrides --geometry)")
    a.add_argument("--height", type=int, default=None, help="latent rows after patching")
    a.add_argument("--width", type=int, default=None, help="latent cols after patching")
    a.add_argument("--frame-scale", default="1", help="comma list of frame multipliers, e.g. 1,2,4")
    a.add_argument("--method", "--pattern", dest="pattern", default="band",
                   choices=("full", "band", "random", "radial"), help="pattern to benchmark")
    a.add_argument("--density", default="0.25", help="comma list of target densities for band/random")
    a.add_argument("--decay", type=float, default=1.0, help="radial: decay factor")
    a.add_argument("--sink-frames", type=int, default=1, help="radial: attention sink frames")
    a.add_argument("--block-size", type=int, default=128, help="block size in tokens")
    a.add_argument("--heads", type=int, default=2, help="attention heads")
    a.add_argument("--head-dim", type=int, default=64, help="head dimension")
    a.add_argument("--backends", default="auto", help="comma list of: auto, torch, flex, triton, reference")
    a.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a.add_argument("--device", default="cpu")
    a.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    a.add_argument("--warmup", type=int, default=1, help="untimed runs per backend (compilation happens here)")
    a.add_argument("--append", default=None, metavar="FILE", help="append the table to this markdown file")
    a.set_defaults(func=run_attention)


def _geometries() -> list[str]:
    from vidattn.bench import GEOMETRIES

    return sorted(GEOMETRIES)


def _fail(message: str) -> int:
    print(f"vidattn bench attention: error: {message}", file=sys.stderr)
    return 2


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"{name} must be a comma list of numbers, got {text!r}") from None


def run_attention(args: argparse.Namespace) -> int:
    import torch

    from vidattn.bench import GEOMETRIES, bench_pattern, time_attention
    from vidattn.kernels import BACKENDS
    from vidattn.layout import TokenLayout

    try:
        if args.geometry is not None and args.geometry not in GEOMETRIES:
            raise ValueError(f"--geometry must be one of {sorted(GEOMETRIES)}, got {args.geometry!r}")
        grid = list(GEOMETRIES[args.geometry or "wan-1.3b-480p"])
        for i, name in enumerate(("frames", "height", "width")):
            value = getattr(args, name)
            if value is not None:
                if value < 1:
                    raise ValueError(f"--{name} must be >= 1, got {value}")
                grid[i] = value
        scales = [int(x) for x in _floats(args.frame_scale, "--frame-scale")]
        if not scales or min(scales) < 1:
            raise ValueError(f"--frame-scale must be positive integers, got {args.frame_scale!r}")
        densities = _floats(args.density, "--density")
        if any(not 0 < d <= 1 for d in densities):
            raise ValueError(f"--density values must lie in (0, 1], got {args.density!r}")
        backends = [b for b in args.backends.split(",") if b]
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise ValueError(f"--backends must be a comma list of {BACKENDS}, got {args.backends!r}")
        for name in ("heads", "head_dim", "block_size", "repeats"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    except ValueError as err:
        return _fail(str(err))
    dtype = getattr(torch, args.dtype)
    if args.pattern not in ("band", "random"):
        densities = [None]
    lines = [
        "| grid (T x H x W) | tokens | pattern | density | backend | time (s) | dense SDPA (s) | speedup | "
        "efficiency | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(lines[0])
    print(lines[1])
    for scale in scales:
        layout = TokenLayout(grid[0] * scale, grid[1], grid[2])
        for density in densities:
            knobs = {"decay": args.decay, "sink_frames": args.sink_frames} if args.pattern == "radial" else {}
            pattern = bench_pattern(args.pattern, layout, density=density or 0.25, block_size=args.block_size,
                                    **knobs)
            rows, errors = time_attention(pattern, heads=args.heads, head_dim=args.head_dim, backends=backends,
                                          repeats=args.repeats, warmup=args.warmup, dtype=dtype,
                                          device=args.device)
            for row in rows:
                if row.name == "dense":
                    continue
                err = errors.get(row.name)
                line = (f"| {layout.frames}x{layout.height}x{layout.width} | {layout.seq_len} | {args.pattern} | "
                        f"{row.density:.3f} | {row.name} | {row.seconds:.3f} | {row.dense_seconds:.3f} | "
                        f"{row.speedup:.2f}x | {row.efficiency:.2f} | {'-' if err is None else f'{err:.1e}'} |")
                print(line, flush=True)
                lines.append(line)
    if args.append:
        _append(Path(args.append), lines, args)
    return 0


def _append(path: Path, lines: list[str], args: argparse.Namespace) -> None:
    import torch

    command = "vidattn " + " ".join(shlex.quote(a) for a in args.argv)
    from vidattn.bench import cpu_name

    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else cpu_name()
    machine = (f"{device} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    header = [
        "",
        f"### attention, {args.pattern}, {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Heads {args.heads}, head dim {args.head_dim}, {args.dtype}, block {args.block_size}, median of "
        f"{args.repeats} interleaved runs.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(header + lines) + "\n")
