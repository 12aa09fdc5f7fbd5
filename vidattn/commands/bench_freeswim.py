"""``vidattn bench freeswim``: FreeSwim's inward window vs dense SDPA (raster and tiled order, token and block
density) and the per-step cost of direct / nocache / cache refinement, in one run (``vidattn.bench_freeswim``).

Registered under ``vidattn bench`` by ``vidattn/commands/bench.py``: ``register(what)`` with its sub-parsers."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Optional

PROG = "vidattn bench freeswim"

DEFAULTS = {"grids": "9x30x52:2,2x68x120:2,1x135x240:1", "base": "30x52", "tiles": "8x16", "heads": 2,
            "head_dim": 128, "block_size": 128, "repeats": 3, "warmup": 1, "step_grid": "2x68x120",
            "step_heads": 2, "step_layers": 2, "text_len": 512}
# --quick: a smoke run in seconds (a 6x10 base grid scaled 2x and 4x, block 32, one head of 32).
QUICK = {"grids": "2x12x20:1,1x24x40:1", "base": "6x10", "tiles": "4x8", "heads": 1, "head_dim": 32,
         "block_size": 32, "repeats": 1, "warmup": 1, "step_grid": "1x12x20", "step_heads": 1, "step_layers": 1,
         "text_len": 16}


def register(what: argparse._SubParsersAction) -> None:
    """Adds ``freeswim`` to ``vidattn bench``'s sub-commands."""
    p = what.add_parser(
        "freeswim", help="FreeSwim: window attention vs dense SDPA and the per-step cost of its refinement modes",
        description="In one run: (a) per latent grid, dense SDPA vs FreeSwim's inward window through "
                    "sparse_attention in raster and in spatial-tile order (q, k, v permuted before timing), with "
                    "token density, block density, pattern build time, speedup and the issue's target; (b) per "
                    "denoising step (CFG included) of a random Wan 2.1 transformer at a scaled-down grid: direct "
                    "full attention, nocache, cache with each --cache-steps, composed from the timed call kinds.")
    p.add_argument("--grids", default=None, metavar="FxRxC[:H],...",
                   help="latent grids (frames x token rows x token cols, after patching), optional heads per grid "
                        f"(default {DEFAULTS['grids']}: the base grid, ~1080p and ~4K)")
    p.add_argument("--base", default=None, metavar="RxC",
                   help=f"base (training) grid in tokens; window half sizes R//2, C//2 (default {DEFAULTS['base']}: "
                        "Wan 480x832)")
    p.add_argument("--tiles", default=None, metavar="RxC", help=f"spatial tile of the tiled order (default "
                                                                 f"{DEFAULTS['tiles']})")
    p.add_argument("--heads", type=int, default=None, help="heads for grids without :H (default 2)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default 128, Wan's)")
    p.add_argument("--block-size", type=int, default=None, help="block size in tokens (default 128)")
    p.add_argument("--backends", default="auto", help="comma list of sparse backends: auto, torch, flex, triton, "
                                                      "reference")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds (median; default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1, at least 1 runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the whole run (default: torch's, i.e. the cores)")
    p.add_argument("--step-grid", default=None, metavar="FxRxC",
                   help=f"grid of the per-step cost model (default {DEFAULTS['step_grid']}); 'none' skips it")
    p.add_argument("--step-heads", type=int, default=None, help="heads of the step model (default 2)")
    p.add_argument("--step-layers", type=int, default=None, help="transformer blocks of the step model (default 2)")
    p.add_argument("--step-order", default="raster", choices=("raster", "tiled"),
                   help="token order of the FreeSwim processor in the step model (tiled: --tiles)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens of the step model (default 512, Wan's)")
    p.add_argument("--cache-steps", default="2,5", help="comma list of cache_steps values (default 2,5)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention rows")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds: base 6x10, grids 2x12x20 and 1x24x40, block 32, one head of 32, "
                        "a 1-layer step model at 1x12x20, 1 repeat (options given explicitly still apply)")
    p.add_argument("--append", default=None, metavar="FILE", help="append the tables to this markdown file")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _pair(text: str, option: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"{option} must be ROWSxCOLS of positive integers, e.g. 8x16, got {text!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{option} must be ROWSxCOLS of positive integers, e.g. 8x16, got {text!r}")
    return a, b


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} must be a comma list of integers >= 1, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} must be a comma list of integers >= 1, got {text!r}")
    return values


def check(args: argparse.Namespace) -> dict:
    """Every user value checked before any work: ValueError with a message naming the option; returns settings."""
    from vidattn.bench_freeswim import parse_grid
    from vidattn.kernels import BACKENDS

    table = QUICK if args.quick else DEFAULTS
    for name in ("grids", "base", "tiles", "heads", "head_dim", "block_size", "repeats", "warmup", "step_grid",
                 "step_heads", "step_layers", "text_len"):
        if getattr(args, name) is None:
            setattr(args, name, table[name])
    for name in ("heads", "head_dim", "block_size", "repeats", "step_heads", "step_layers", "text_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    base = _pair(args.base, "--base")
    tiles = _pair(args.tiles, "--tiles")
    grids = []
    for item in [x for x in args.grids.split(",") if x.strip()]:
        try:
            f, r, c, h = parse_grid(item)
        except ValueError as err:
            raise ValueError(f"--grids: {err}") from None
        grids.append(((f, r, c), h or args.heads))
    if not grids and not args.no_attention:
        raise ValueError(f"--grids must name at least one grid, got {args.grids!r}")
    step_grid: Optional[tuple[int, int, int]] = None
    if args.step_grid.strip().lower() != "none":
        try:
            f, r, c, h = parse_grid(args.step_grid)
        except ValueError as err:
            raise ValueError(f"--step-grid: {err}") from None
        if h is not None:
            raise ValueError(f"--step-grid takes FxRxC (heads: --step-heads), got {args.step_grid!r}")
        step_grid = (f, r, c)
    cache_steps = _ints(args.cache_steps, "--cache-steps")
    backends = tuple(b for b in args.backends.split(",") if b)
    if not backends or any(b not in BACKENDS for b in backends):
        raise ValueError(f"--backends must be a comma list of {BACKENDS}, got {args.backends!r}")
    if args.head_dim % 2:
        raise ValueError(f"--head-dim must be even (Wan's rotary embedding pairs channels), got {args.head_dim}")
    from vidattn.validation import check_backend, check_device

    # the shared checks (UsageError is a ValueError, printed by run like the others): a known, present device;
    # backends that run on it, naming those that can
    args.device = check_device(args.device)
    for name in backends:
        check_backend(name, args.device, option="--backends")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.no_attention and step_grid is None:
        raise ValueError("--no-attention with --step-grid none leaves nothing to measure")
    return {"grids": grids, "base": base, "tiles": tiles, "step_grid": step_grid, "cache_steps": cache_steps,
            "backends": backends}


def run(args: argparse.Namespace) -> int:
    try:
        settings = check(args)
    except ValueError as err:
        return _fail(str(err))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.load_start = _load()
    dtype = getattr(torch, args.dtype)
    sections: list[list[str]] = []
    verdicts: list[str] = []
    if not args.no_attention:
        lines, v = _attention(args, settings, dtype)
        sections.append(lines)
        verdicts += v
    if settings["step_grid"] is not None:
        lines, v = _steps(args, settings, dtype)
        sections.append(lines)
        verdicts += v
    if verdicts:
        print()
        for line in verdicts:
            print(line)
    if args.append:
        _append(Path(args.append), sections, verdicts, args, settings)
    return 0


def _load() -> str:
    """The system's load averages (other processes share the cores: sparse CPU timings suffer most)."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None, file=sys.stderr)


ATTN_HEADER = ["| grid (T x H x W) | tokens | heads | order | backend | token density | block density | "
               "build (s) | time (s) | dense SDPA (s) | speedup | efficiency | max abs diff | target |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _attention(args: argparse.Namespace, settings: dict, dtype) -> tuple[list[str], list[str]]:
    from vidattn.bench_freeswim import target_for, time_window

    lines = list(ATTN_HEADER)
    print("\n".join(lines), flush=True)
    verdicts = []
    base, tiles, backends = settings["base"], settings["tiles"], settings["backends"]
    for grid, heads in settings["grids"]:
        f, r, c = grid
        steps = 2 + max(args.warmup, 1) * (1 + 2 * len(backends)) + args.repeats
        with _progress(steps, f"window {f}x{r}x{c}") as bar:
            rows = time_window(grid, heads, base=base, tiles=tiles, head_dim=args.head_dim,
                               block_size=args.block_size, backends=backends, repeats=args.repeats,
                               warmup=args.warmup, dtype=dtype, device=args.device, seed=args.seed,
                               progress=lambda label: (bar.set_postfix_str(label), bar.update()))
        target = target_for(r, c, base)
        best = None
        for row in rows:
            verdict = "-"
            if row.order != "dense" and target is not None:
                verdict = f">= {target:g}x {'ok' if row.speedup >= target else 'MISS'}"
                best = row if best is None or row.speedup > best.speedup else best
            diff = "-" if row.max_diff is None else f"{row.max_diff:.1e}"
            build = "-" if row.build_seconds is None else f"{row.build_seconds:.3f}"
            line = (f"| {f}x{r}x{c} | {row.tokens} | {heads} | {row.order} | {row.backend} | "
                    f"{row.token_density:.4f} | {row.block_density:.4f} | {build} | {row.seconds:.3f} | "
                    f"{row.dense_seconds:.3f} | {row.speedup:.2f}x | {row.efficiency:.2f} | {diff} | {verdict} |")
            print(line, flush=True)
            lines.append(line)
        if best is not None:
            verdicts.append(f"target: window attention >= {target:g}x dense SDPA at {f}x{r}x{c} "
                            f"({r / base[0]:.2f}x base per axis): best {best.order}/{best.backend} "
                            f"{best.speedup:.2f}x -> {'ok' if best.speedup >= target else 'MISS'}")
    return lines, verdicts


STEP_HEADER = ["| grid (T x H x W) | tokens | model | mode | full passes / step | window passes / step | "
               "time per step (s) | vs direct |",
               "|---|---|---|---|---|---|---|---|"]


def _steps(args: argparse.Namespace, settings: dict, dtype) -> tuple[list[str], list[str]]:
    from vidattn.bench_freeswim import time_steps

    f, r, c = grid = settings["step_grid"]
    cache_steps = settings["cache_steps"]
    tiles = settings["tiles"] if args.step_order == "tiled" else None
    steps = max(args.warmup, 1) * 4 + args.repeats
    with _progress(steps, f"steps {f}x{r}x{c}") as bar:
        costs = time_steps(grid, base=settings["base"], heads=args.step_heads, head_dim=args.head_dim,
                           layers=args.step_layers, text_len=args.text_len, tiles=tiles,
                           block_size=args.block_size, cache_steps=cache_steps, repeats=args.repeats,
                           warmup=args.warmup, dtype=dtype, device=args.device, seed=args.seed,
                           backend=settings["backends"][0],
                           progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    model = (f"Wan {args.step_layers}L {args.step_heads}x{args.head_dim}"
             + (f" {args.step_order} {tiles[0]}x{tiles[1]}" if tiles else ""))
    passes = {"direct": ("2", "0"), "nocache": ("2", "2"), "window only": ("0", "2")}
    for cs in cache_steps:
        passes[f"cache c={cs}"] = (f"1/{cs}", "2")
    lines = list(STEP_HEADER)
    print()
    print("\n".join(lines), flush=True)
    for mode, seconds in costs.modes.items():
        full, window = passes[mode]
        line = (f"| {f}x{r}x{c} | {f * r * c} | {model} | {mode} | {full} | {window} | {seconds:.3f} | "
                f"{costs.relative(mode):.2f}x |")
        print(line, flush=True)
        lines.append(line)
    call_line = ("Calls (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.calls.items())
                 + " (direct = stock processors; full = full self-attention + cross-attention recorded; "
                   "window_replay / window_own = window self-attention with the cross-attention replayed / own).")
    print(call_line, flush=True)
    lines += ["", call_line]
    verdicts = []
    if 2 in cache_steps:
        rel = costs.relative("cache c=2")
        verdicts.append(f"target: cache mode with cache_steps=2 faster than direct full-attention refinement at "
                        f"{f}x{r}x{c}: {rel:.2f}x the direct step time -> {'ok' if rel < 1 else 'MISS'}")
    return lines, verdicts


def _append(path: Path, sections: list[list[str]], verdicts: list[str], args: argparse.Namespace,
            settings: dict) -> None:
    import torch

    from vidattn.bench import cpu_name

    command = "vidattn " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    device = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
              else cpu_name())
    machine = (f"{device} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; load average (1, 5, 15 min) at the start "
               f"{getattr(args, 'load_start', '?')}, at the end {_load()}")
    base, tiles = settings["base"], settings["tiles"]
    header = ["", f"### freeswim, {datetime.date.today().isoformat()}", "",
              f"Command: `{command}`  ", f"Machine: {machine}  ",
              f"Base grid {base[0]}x{base[1]} (window {2 * (base[0] // 2) + 1}x{2 * (base[1] // 2) + 1}, inward, "
              f"all frames), tiles {tiles[0]}x{tiles[1]}, head dim {args.head_dim}, {args.dtype}, block "
              f"{args.block_size}, median of {args.repeats} interleaved runs after {max(args.warmup, 1)} warm-up.",
              ""]
    body: list[str] = []
    for section in sections:
        body += section + [""]
    body += [f"- {v}" for v in verdicts]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write("\n".join(header + body) + "\n")
