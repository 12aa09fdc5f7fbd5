"""``vidattn bench attention``: sparse backends vs dense SDPA on one layout, in one process, interleaved."""
from __future__ import annotations

import argparse
import datetime
import math
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
    a.add_argument("--geometry", default=None, help="named latent grid: " + ", ".join(_geometries())
                   + " (default wan-1.3b-480p)")
    a.add_argument("--frames", type=int, default=None, help="latent frames (overrides --geometry)")
    a.add_argument("--height", "--rows", dest="height", type=int, default=None, help="latent rows after patching")
    a.add_argument("--width", "--cols", dest="width", type=int, default=None, help="latent cols after patching")
    a.add_argument("--frame-scale", default="1", help="comma list of frame multipliers, e.g. 1,2,4")
    a.add_argument("--method", "--pattern", dest="pattern", default="band",
                   choices=("full", "band", "random", "radial", "rectified"),
                   help="pattern to benchmark; rectified: dense, plain block-sparse on the same critical blocks and "
                        "Rectified SpaAttn per drop rate, plus radial as a reference row, on structured q, k, v "
                        "(vidattn.fidelity.structured_qkv) in Gilbert order")
    a.add_argument("--density", default="0.25", help="comma list of target densities for band/random")
    a.add_argument("--drop-rates", default="0.75,0.85,0.9", help="rectified: comma list of drop rates in [0, 1)")
    a.add_argument("--top-p", type=float, default=0.3, help="rectified: cumulative-mass threshold in (0, 1]")
    a.add_argument("--fidelity", action="store_true",
                   help="run on structured q, k, v (smooth fields + Wan 3-D RoPE) and add the relative L2 error "
                        "against dense SDPA (fp32) over the video rows")
    a.add_argument("--seed", type=int, default=0, help="seed of the q, k, v generator")
    a.add_argument("--field-length", default="4,8,8", metavar="T,Y,X",
                   help="structured inputs: correlation lengths of the smooth fields in latent tokens (t, y, x)")
    a.add_argument("--locality", type=float, default=0.6,
                   help="structured inputs: scale of the shared positional component (RoPE locality kernel)")
    a.add_argument("--quick", action="store_true",
                   help="a small run for smoke tests: 4x8x16 grid, block 32, 1 head of 32, 1 repeat (options given "
                        "explicitly still apply)")
    a.add_argument("--decay", type=float, default=1.0, help="radial: decay factor")
    a.add_argument("--sink-frames", type=int, default=1, help="radial: attention sink frames")
    a.add_argument("--block-size", type=int, default=None, help="block size in tokens (default 128)")
    a.add_argument("--heads", type=int, default=None, help="attention heads (default 2)")
    a.add_argument("--head-dim", type=int, default=None, help="head dimension (default 64; Wan's is 128)")
    a.add_argument("--backends", default="auto", help="comma list of: auto, torch, flex, triton, reference "
                                                      "(rectified: exactly one)")
    a.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a.add_argument("--device", default="cpu")
    a.add_argument("--repeats", type=int, default=None, help="timed runs per backend (median reported; default 3)")
    a.add_argument("--warmup", type=int, default=1, help="untimed runs per backend (compilation happens here)")
    a.add_argument("--append", default=None, metavar="FILE", help="append the table to this markdown file")
    a.set_defaults(func=run_attention)
    from . import bench_freeswim, bench_train  # stdlib imports only: --help stays fast

    bench_freeswim.register(what)
    bench_train.register(what)


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


QUICK = {"grid": (4, 8, 16), "block_size": 32, "heads": 1, "head_dim": 32, "repeats": 1}
DEFAULTS = {"block_size": 128, "heads": 2, "head_dim": 64, "repeats": 3}


def _check(args: argparse.Namespace) -> dict:
    """Every user value checked before any work; ValueError naming the option. Returns the resolved settings."""
    from vidattn.bench import GEOMETRIES
    from vidattn.kernels import BACKENDS

    if args.geometry is not None and args.geometry not in GEOMETRIES:
        raise ValueError(f"--geometry must be one of {sorted(GEOMETRIES)}, got {args.geometry!r}")
    if args.quick and args.geometry is None:
        grid = list(QUICK["grid"])
    else:
        grid = list(GEOMETRIES[args.geometry or "wan-1.3b-480p"])
    for i, (name, flag) in enumerate((("frames", "--frames"), ("height", "--height/--rows"),
                                      ("width", "--width/--cols"))):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
            grid[i] = value
    for name in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else DEFAULTS[name])
    scales = [int(x) for x in _floats(args.frame_scale, "--frame-scale")]
    if not scales or min(scales) < 1:
        raise ValueError(f"--frame-scale must be positive integers, got {args.frame_scale!r}")
    densities = _floats(args.density, "--density")
    if any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"--density values must lie in (0, 1], got {args.density!r}")
    drop_rates = _floats(args.drop_rates, "--drop-rates")
    if not drop_rates or any(not 0 <= d < 1 for d in drop_rates):
        raise ValueError(f"--drop-rates must be a comma list of numbers in [0, 1), got {args.drop_rates!r}")
    from vidattn.validation import check_backend, check_device

    # UsageError is a ValueError: the caller prints it as one line like the checks below.
    device = check_device(args.device)
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ValueError(f"--backends must be a comma list of {BACKENDS}, got {args.backends!r}")
    for name in backends:  # a backend that cannot run on this device is refused, naming those that can
        check_backend(name, device, option="--backends")
    if args.pattern == "rectified" and len(backends) != 1:
        raise ValueError(f"--backends takes exactly one backend with --method rectified, got {args.backends!r}")
    for name in ("heads", "head_dim", "block_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    length = _floats(args.field_length, "--field-length")
    if len(length) != 3 or any(not (x > 0 and math.isfinite(x)) for x in length):
        raise ValueError(f"--field-length must be three positive numbers T,Y,X, got {args.field_length!r}")
    if not (args.locality >= 0 and math.isfinite(args.locality)):
        raise ValueError(f"--locality must be >= 0, got {args.locality}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if (args.fidelity or args.pattern == "rectified") and args.head_dim % 2:
        raise ValueError(f"--head-dim must be even for the structured inputs (rotary pairs), got {args.head_dim}")
    if args.pattern in ("radial", "rectified"):
        if not args.decay > 0:
            raise ValueError(f"--decay must be > 0, got {args.decay}")
        if not 0 <= args.sink_frames <= grid[0]:
            raise ValueError(f"--sink-frames must lie in [0, frames={grid[0]}], got {args.sink_frames}")
    return {"grid": grid, "scales": scales, "densities": densities, "drop_rates": drop_rates, "backends": backends,
            "generator": {"seed": args.seed, "length": tuple(length), "locality": args.locality}}


def run_attention(args: argparse.Namespace) -> int:
    try:
        settings = _check(args)
    except ValueError as err:
        return _fail(str(err))
    if args.pattern == "rectified":
        lines = _run_rectified(args, settings)
    else:
        lines = _run_patterns(args, settings)
    if args.append:
        _append(Path(args.append), lines, args)
    return 0


def _run_patterns(args: argparse.Namespace, settings: dict) -> list[str]:
    import torch

    from vidattn.bench import bench_pattern, time_attention
    from vidattn.layout import TokenLayout

    dtype = getattr(torch, args.dtype)
    grid, backends = settings["grid"], settings["backends"]
    densities = settings["densities"] if args.pattern in ("band", "random") else [None]
    lines = [
        "| grid (T x H x W) | tokens | pattern | density | backend | time (s) | dense SDPA (s) | speedup | "
        "efficiency | max abs diff |" + (" rel L2 vs dense |" if args.fidelity else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.fidelity else ""),
    ]
    print(lines[0])
    print(lines[1])
    for scale in settings["scales"]:
        layout = TokenLayout(grid[0] * scale, grid[1], grid[2])
        for density in densities:
            knobs = {"decay": args.decay, "sink_frames": args.sink_frames} if args.pattern == "radial" else {}
            pattern = bench_pattern(args.pattern, layout, density=density or 0.25, block_size=args.block_size,
                                    **knobs)
            qkv = None
            if args.fidelity:
                from vidattn.fidelity import structured_qkv

                qkv = structured_qkv(layout.frames, layout.height, layout.width, args.heads, args.head_dim,
                                     dtype=dtype, **settings["generator"])
            rows, errors = time_attention(pattern, heads=args.heads, head_dim=args.head_dim, backends=backends,
                                          repeats=args.repeats, warmup=args.warmup, dtype=dtype,
                                          device=args.device, seed=args.seed, qkv=qkv)
            for row in rows:
                if row.name == "dense":
                    continue
                err = errors.get(row.name)
                line = (f"| {layout.frames}x{layout.height}x{layout.width} | {layout.seq_len} | {args.pattern} | "
                        f"{row.density:.3f} | {row.name} | {row.seconds:.3f} | {row.dense_seconds:.3f} | "
                        f"{row.speedup:.2f}x | {row.efficiency:.2f} | {'-' if err is None else f'{err:.1e}'} |")
                if args.fidelity:
                    line += f" {row.rel_error:.4f} |"
                print(line, flush=True)
                lines.append(line)
    return lines


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _run_rectified(args: argparse.Namespace, settings: dict) -> list[str]:
    import torch
    from tqdm import tqdm

    from vidattn.fidelity import fidelity_rows, structured_qkv

    dtype = getattr(torch, args.dtype)
    grid, drop_rates, backend = settings["grid"], settings["drop_rates"], settings["backends"][0]
    fid = args.fidelity
    lines = [
        "| grid (T x H x W) | tokens | method | drop rate | density |" + (" rel L2 err |" if fid else "")
        + " selection (s) | plan (s) | attention (s) | total (s) | dense SDPA (s) | speedup | selection / dense |",
        "|---|---|---|---|---|" + ("---|" if fid else "") + "---|---|---|---|---|---|---|",
    ]
    print(lines[0])
    print(lines[1])
    steps = (args.warmup + args.repeats) * (2 + len(drop_rates))
    for scale in settings["scales"]:
        f, r, c = grid[0] * scale, grid[1], grid[2]
        q, k, v = (x.to(args.device) for x in structured_qkv(f, r, c, args.heads, args.head_dim, dtype=dtype,
                                                              **settings["generator"]))
        with tqdm(total=steps, desc=f"{f}x{r}x{c}", unit="step", leave=False, disable=None,
                  file=sys.stderr) as bar:
            rows = fidelity_rows(q, k, v, (f, r, c), drop_rates=drop_rates, top_p=args.top_p,
                                 block_size=args.block_size, backend=backend, radial_decay=args.decay,
                                 radial_sink_frames=args.sink_frames, repeats=args.repeats, warmup=args.warmup,
                                 progress=lambda label: (bar.set_postfix_str(label), bar.update()))
        for row in rows:
            share = row.selection_share
            line = (f"| {f}x{r}x{c} | {f * r * c} | {row.method} | "
                    f"{'-' if row.drop_rate is None else f'{row.drop_rate:g}'} | {row.density:.3f} |"
                    + (f" {row.error:.4f} |" if fid else "")
                    + f" {_seconds(row.selection_seconds)} | {_seconds(row.plan_seconds)} | "
                    f"{row.attention_seconds:.3f} | {row.seconds:.3f} | {row.dense_seconds:.3f} | "
                    f"{row.speedup:.2f}x | {'-' if share is None else f'{100 * share:.2f} %'} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def _append(path: Path, lines: list[str], args: argparse.Namespace) -> None:
    import torch

    env = [f"{name}={shlex.quote(os.environ[name])}"
           for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ]
    command = " ".join([*env, "vidattn", *(shlex.quote(a) for a in args.argv)])
    from vidattn.bench import cpu_name

    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else cpu_name()
    machine = (f"{device} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    if args.pattern == "rectified" and hasattr(os, "getloadavg"):
        machine += f", load average {os.getloadavg()[1]:.1f} (5 min) at the end of the run"
    header = [
        "",
        f"### attention, {args.pattern}, {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Heads {args.heads}, head dim {args.head_dim}, {args.dtype}, block {args.block_size}, median of "
        f"{args.repeats} interleaved runs.",
    ]
    if args.fidelity or args.pattern == "rectified":
        header[-1] += "  "
        header.append(f"Inputs: `vidattn.fidelity.structured_qkv(seed={args.seed}, length=({args.field_length}), "
                      f"locality={args.locality:g})` (smooth random fields, Wan-style 3-D RoPE); errors are relative "
                      f"L2 against dense SDPA in fp32 over the video rows.")
    if args.pattern == "rectified":
        header[-1] += "  "
        header.append(f"Rectified: top_p {args.top_p}, Gilbert order, backend {args.backends}; plain = the same "
                      f"critical blocks without rectification; radial (decay {args.decay:g}, sink frames "
                      f"{args.sink_frames}) on the raster order at its own density.")
    header.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(header + lines) + "\n")
