"""Benchmark the triton block-sparse backend against compiled FlexAttention and dense flash SDPA (bf16, CUDA).

Shapes, in this order (the first is the one that matters most): HunyuanVideo 720p x 125 frames (32 x 45 x 80 latent
tokens + 256 text tokens last, 24 heads, d=128), then Wan2.1-1.3B 480p x 81 frames (21 x 30 x 52, 12 heads, d=128).
Patterns per shape: radial (``vidattn.radial_pattern`` on the real token layout), all-ones, random blocks at 10 / 25
/ 50 % (one mask shared by the heads, diagonal kept). For each (pattern, pass) the backends dense flash SDPA,
triton and FlexAttention run **interleaved**: after one warm-up call each, ``--reps`` rounds of one CUDA-event-timed
call per backend; the median is reported, and the dense time of the same rounds is the speedup baseline.

    speedup    = dense time / time
    efficiency = speedup * density     (1.0: the time shrinks exactly like the computed fraction; density = token
                                        pairs inside listed blocks)
    ratio      = time / dense time     (reported for all-ones: the sparse path's overhead on dense work)
    TFLOP/s    = 4 * B * H * D * pairs / time (forward; fwd+bwd counts 3.5x, FlashAttention's convention)

FlexAttention is ``torch.compile(flex_attention, dynamic=False)`` on the pattern's ``BlockMask``; its first call in
this process is reported apart ("first call s": dynamo + inductor, from the inductor cache when the precompile step
of gpu_check.sh filled it; that step reports the cold compile). Triton's autotuner is run first on a copy of the
inputs reduced to ``--tune-heads`` heads (same autotune key, so the full-size calls reuse the choice without timing
every config at full size). Each shape has a time budget (``--budget-s`` split so later shapes keep a reserve); the
deadline is checked between timed rounds, and rows left are written as skipped. ``gpu_bench.md`` / ``gpu_bench.json``
under ``--out`` are rewritten after every (pattern, pass) group, so a run killed by a timeout keeps what it measured.

Other modes: ``--ceilings`` (bf16 matmul TFLOP/s and device-to-device copy GB/s, appended to environment.txt),
``--profile`` (per-kernel CUDA profile of one triton forward+backward on the first shape's radial pattern, then the
registers / spills / shared memory of every compiled triton kernel of this process), ``--summary`` (the final table
of gpu_check.sh, from the files under ``--out``; needs no torch), ``--extra`` (forward rows with their own budget:
Rectified SpaAttn end to end and its selection alone on both shapes, FreeSwim's window at 1080p and 4K in raster
order via triton and in 8x16 tiles via flex; added to gpu_bench.md / .json). ``--dry-run`` runs each mode at tiny
size on the CPU (the triton kernels under ``TRITON_INTERPRET=1``, FlexAttention eager, host timers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# The --summary step reads files only: it must run (fast) where torch is missing or broken.
if not (__name__ == "__main__" and "--summary" in sys.argv[1:]):
    import torch


@dataclass(frozen=True)
class Shape:
    """A video attention problem: ``frames x height x width`` latent tokens plus ``text`` tokens (last)."""

    key: str
    title: str
    batch: int
    heads: int
    head_dim: int
    frames: int
    height: int
    width: int
    text: int = 0
    sink_frames: int = 0

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text


SHAPES = {
    "hunyuan": Shape("hunyuan", "HunyuanVideo 720p x 125f", 1, 24, 128, 32, 45, 80, 256, 0),
    "wan": Shape("wan", "Wan2.1-1.3B 480p x 81f", 1, 12, 128, 21, 30, 52, 0, 1),
}
PASSES = ("fwd", "fwd+bwd")
DEFAULT_DENSITIES = [0.1, 0.25, 0.5]
DENSE, TRITON, FLEX = "sdpa flash", "triton", "flex"
SUMMARY_FILE = "summary.txt"


def reduced(shape: Shape) -> Shape:
    """The dry-run stand-in: one 64-token block or a little more, two heads."""
    return replace(shape, heads=2, head_dim=32, frames=2, height=4, width=6, text=min(shape.text, 16))


def device_of(args: argparse.Namespace) -> str:
    return "cpu" if args.dry_run else "cuda"


def dtype_of(args: argparse.Namespace) -> "torch.dtype":
    return torch.float32 if args.dry_run else torch.bfloat16


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- patterns
def random_mask(nb: int, density: float, seed: int = 0) -> "torch.Tensor":
    """Bernoulli blocks whose total density (diagonal included) is about ``density``; shared by all heads."""
    g = torch.Generator().manual_seed(seed)
    p = max(0.0, (density * nb - 1) / max(nb - 1, 1))
    return (torch.rand(nb, nb, generator=g) < p) | torch.eye(nb, dtype=torch.bool)


def radial(shape: Shape, block: int):
    from vidattn.layout import TextSegment, TokenLayout
    from vidattn.patterns import radial_pattern

    text = TextSegment(shape.text, "last") if shape.text else None
    layout = TokenLayout(shape.frames, shape.height, shape.width, text=text)
    return radial_pattern(layout, block_size=block, sink_frames=min(shape.sink_frames, shape.frames))


def build_patterns(shape: Shape, block: int, densities: list[float], device: str) -> list[tuple[str, object]]:
    """``[(name, BlockPattern)]`` in measuring order: radial, all-ones, then the random densities."""
    from vidattn.kernels import BlockPattern

    s = shape.seq_len
    nb = -(-s // block)
    out = []
    try:
        out.append(("radial", radial(shape, block)))
    except (ImportError, TypeError, ValueError) as exc:
        print(f"radial pattern unavailable for {shape.key}: {exc}", file=sys.stderr)
    out.append(("all-ones", BlockPattern.full(s, block_q=block)))
    for d in densities:
        out.append((f"random {d:.0%}", BlockPattern.from_block_mask(random_mask(nb, d), q_len=s, kv_len=s,
                                                                    block_q=block)))
    return [(name, p.to(device)) for name, p in out]


# ---------------------------------------------------------------------------------------------------- backends
def flops(shape: Shape, pairs: float, pass_: str) -> float:
    fwd = 4.0 * shape.batch * shape.heads * shape.head_dim * pairs
    return fwd if pass_ == "fwd" else 3.5 * fwd


def dense_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def triton_backend(pattern) -> Callable:
    from vidattn.kernels import sparse_attention

    return lambda q, k, v: sparse_attention(q, k, v, pattern, backend="triton")


def flex_function(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_backend(pattern, flex_fn: Callable) -> Callable:
    block_mask = pattern.to_block_mask()
    return lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask)


def make_runner(attn: Callable, q, k, v, pass_: str, grad=None) -> Callable:
    """A no-argument call of ``attn`` for one pass: ``fwd`` under no_grad, ``fwd+bwd`` = forward + autograd.grad."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return attn(q, k, v)
        return run
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q) if grad is None else grad

    def run_bwd():
        out = attn(*leaves)
        return torch.autograd.grad(out, leaves, grad)
    return run_bwd


def make_inputs(shape: Shape, device: str, dtype, heads: int | None = None, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = shape.heads if heads is None else heads
    return [torch.randn(shape.batch, h, shape.seq_len, shape.head_dim, device=device, dtype=dtype, generator=g)
            for _ in range(4)]  # q, k, v, the output gradient


def pretune(pattern, q, k, v, grad, heads: int, device: str) -> float:
    """Run the triton autotuner on the first ``heads`` heads (the autotune key ignores the head count, so the
    full-size calls reuse its choice); returns the seconds it took."""
    if device != "cuda":
        return 0.0
    t0 = time.perf_counter()
    sub = [t[:, :heads] for t in (q, k, v, grad)]
    fn = triton_backend(pattern)
    make_runner(fn, *sub[:3], "fwd")()
    make_runner(fn, *sub[:3], "fwd+bwd", grad=sub[3])()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on the GPU, the host clock (after a synchronisation) elsewhere."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self):
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> Callable[[], float]:
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return lambda: start.elapsed_time(ev)
        t = time.perf_counter()
        return lambda: (t - start) * 1e3


def time_group(runners: dict[str, Callable], reps: int, deadline: float, device: str) -> dict[str, list[float]]:
    """Interleaved rounds: each round calls every runner once, timed on its own; stops at ``deadline``."""
    clock = Clock(device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        if time.monotonic() > deadline:
            break
        pending = []
        for name, fn in runners.items():
            start = clock.start()
            fn()
            pending.append((name, clock.stop(start)))
        sync(device)
        for name, elapsed in pending:
            times[name].append(elapsed())
    return times


def first_call(fn: Callable, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- rows, tables
def row(shape: Shape, pattern: str, density: float, backend: str, pass_: str, times: list[float] | None = None,
        dense_ms: float | None = None, first_s: float | None = None, note: str = "") -> dict:
    pairs = density * shape.seq_len * shape.seq_len
    ms = statistics.median(times) if times else None
    r = {"shape": shape.key, "title": shape.title, "tokens": shape.seq_len, "heads": shape.heads,
         "pattern": pattern, "density": density, "backend": backend, "pass": pass_, "ms": ms,
         "n": len(times or []), "spread": (max(times) - min(times)) / ms if times and ms else None,
         "gflop": flops(shape, pairs, pass_) / 1e9, "tflops": None, "dense_ms": dense_ms, "speedup": None,
         "efficiency": None, "ratio": None, "first_s": first_s, "note": note}
    if ms:
        r["tflops"] = flops(shape, pairs, pass_) / (ms * 1e-3) / 1e12
        if dense_ms and backend != DENSE:
            r["speedup"] = dense_ms / ms
            r["efficiency"] = r["speedup"] * density
            r["ratio"] = ms / dense_ms
    return r


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| shape | pattern | density | backend | pass | time (ms) | n | spread | TFLOP/s | speedup "
             "| efficiency | time / dense | first call (s) | note |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['title']} ({r['tokens']} tok, {r['heads']} heads) | {r['pattern']} | "
                     f"{r['density']:.3f} | {r['backend']} | {r['pass']} | {fmt(r['ms'], 3)} | {r['n']} | "
                     f"{fmt(r['spread'])} | {fmt(r['tflops'], 1)} | {fmt(r['speedup'])} | {fmt(r['efficiency'])} | "
                     f"{fmt(r['ratio'])} | {fmt(r['first_s'], 1)} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], args: argparse.Namespace, extra: str = "") -> str:
    """(Re)write gpu_bench.md and gpu_bench.json under ``args.out``; returns the markdown."""
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    header = (f"# Block-sparse attention benchmark ({'fp32, dry run' if args.dry_run else 'bf16'})\n\n"
              f"{dev}, torch {torch.__version__}, triton {triton.__version__}; median of up to {args.reps} "
              f"interleaved rounds after one warm-up call per backend; blocks {args.block}x{args.block}. "
              "efficiency = (dense / time) x density, dense = flash SDPA of the same rounds; spread = "
              f"(max - min) / median.{extra}")
    table = markdown(rows, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"dry_run": args.dry_run, "rows": rows}, f, indent=1)
    return table


# ---------------------------------------------------------------------------------------------------- benchmark
def benchmark(args: argparse.Namespace) -> list[dict]:
    device, dtype = device_of(args), dtype_of(args)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device (use --dry-run on CPU)")
    flex_fn = None if args.no_flex else flex_function(compiled=not args.dry_run)
    rows: list[dict] = []
    start = time.monotonic()
    end = start + args.budget_s
    notes = []
    for i, key in enumerate(args.shapes):
        shape = reduced(SHAPES[key]) if args.dry_run else SHAPES[key]
        # The first shape may spend all but the reserve of the shapes after it.
        deadline = end - args.shape_reserve_s * (len(args.shapes) - 1 - i)
        print(f"== {shape.title}: {shape.seq_len} tokens, {shape.heads} heads, d={shape.head_dim}; "
              f"{deadline - time.monotonic():.0f} s budget", flush=True)
        q, k, v, grad = make_inputs(shape, device, dtype)
        patterns = build_patterns(shape, args.block, args.densities, device)
        try:
            tune_s = pretune(patterns[0][1], q, k, v, grad, min(args.tune_heads, shape.heads), device)
        except Exception as exc:  # noqa: BLE001 (the triton rows below then fail one by one, with their errors)
            tune_s = 0.0
            notes.append(f"{shape.key}: triton autotune failed: {type(exc).__name__}: {str(exc)[:120]}")
            print(f"   triton autotune FAILED: {type(exc).__name__}: {exc}", flush=True)
        if tune_s:
            notes.append(f"{shape.key}: triton autotune on {min(args.tune_heads, shape.heads)} heads took "
                         f"{tune_s:.1f} s")
            print(f"   triton autotune ({min(args.tune_heads, shape.heads)} heads): {tune_s:.1f} s", flush=True)
        dense_first: dict[str, float] = {}
        for name, pattern in patterns:
            density = pattern.density()
            for pass_ in args.passes:
                backends = {DENSE: dense_sdpa, TRITON: triton_backend(pattern)}
                if flex_fn is not None:
                    backends[FLEX] = flex_backend(pattern, flex_fn)
                if time.monotonic() > deadline:
                    rows += [row(shape, name, density, b, pass_, note="skipped: time budget") for b in backends]
                    continue
                runners, first, notes_b = {}, {}, {}
                for b, fn in backends.items():
                    runner = make_runner(fn, q, k, v, pass_, grad)
                    try:
                        if b == DENSE and pass_ in dense_first:
                            first[b] = None
                        else:
                            first[b] = first_call(runner, device)
                            if b == DENSE:
                                dense_first[pass_] = first[b]
                        runners[b] = runner
                    except Exception as exc:  # noqa: BLE001 (a failed backend is a row, not the end of the run)
                        notes_b[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                times = time_group(runners, args.reps, deadline, device) if runners else {}
                dense_ms = statistics.median(times[DENSE]) if times.get(DENSE) else None
                group = []
                for b in backends:
                    t = times.get(b) or None
                    note = notes_b.get(b, "" if t else "skipped: time budget")
                    group.append(row(shape, name, density, b, pass_, t, dense_ms, first.get(b), note))
                rows += group
                for r in group:
                    print(markdown([r], "").splitlines()[-1], flush=True)
                write_tables(rows, args, " " + "; ".join(notes) if notes else "")
        del q, k, v, grad, patterns
        if device == "cuda":
            torch.cuda.empty_cache()
    write_tables(rows, args, " " + "; ".join(notes) if notes else "")
    return rows


# ---------------------------------------------------------------------------------------------------- extra rows
# ``--extra`` (gpu_check.sh step 4b, its own time budget after the main benchmark): forward only, bf16.
#   rectified: Rectified SpaAttn end to end (``rectified_attention``: selection + triton kernel with the epilogue)
#              and the selection alone (``rectified_selection``) per drop rate, vs SDPA flash, on the main shapes;
#   window:    FreeSwim's inward window (base 30 x 52, window 31 x 53, all frames) in raster order through triton
#              (WindowPredicate in-kernel) and in 8 x 16 spatial tiles through ``auto`` (triton refuses the permuted
#              predicate, so flex), vs SDPA flash; q, k, v are permuted into the tiled order before timing.
EXTRA_SECTIONS = ("rectified", "window")
RECTIFIED_SHAPES = ("wan", "hunyuan")
DEFAULT_DROP_RATES = (0.75, 0.9)
WINDOW_SHAPES = {
    "freeswim-1080p": Shape("freeswim-1080p", "FreeSwim Wan 1088x1920 x 81f", 1, 12, 128, 21, 68, 120),
    "freeswim-4k": Shape("freeswim-4k", "FreeSwim Wan 2160x3840 x 1f", 1, 12, 128, 1, 135, 240),
}
WINDOW_BASE, WINDOW_TILES = (30, 52), (8, 16)
EXTRA_MARK = "## Extra rows"


def reduced_window(shape: Shape) -> tuple[Shape, tuple[int, int], tuple[int, int]]:
    """Dry-run stand-in of a window shape, its base grid and tiles (the same scale over the base per axis)."""
    small = replace(shape, heads=2, head_dim=32, frames=min(shape.frames, 2),
                    height=max(1, round(shape.height * 4 / 30)), width=max(1, round(shape.width * 6 / 52)))
    return small, (4, 6), (4, 4)


def reduced_rectified(shape: Shape) -> Shape:
    return replace(shape, heads=2, head_dim=32, frames=2, height=8, width=8, text=min(shape.text, 16))


def extra_row(shape: Shape, section: str, pattern: str, density: float, backend: str,
              times: list[float] | None, dense_ms: float | None, first_s: float | None = None, note: str = "",
              **more) -> dict:
    r = row(shape, pattern, density, backend, "fwd", times, dense_ms, first_s, note)
    r.update(section=section, **more)
    if more.get("overhead"):  # selection alone: a share of the dense time, not attention work
        r["tflops"] = r["efficiency"] = None
    return r


def _deadline_note(deadline: float, need_s: float = 0.0) -> str:
    left = deadline - time.monotonic()
    return "" if left > need_s else f"skipped: time budget ({max(left, 0):.0f} s left, needs ~{need_s:.0f} s)"


def _time_extra(shape: Shape, section: str, specs: list[tuple], q, k, v, reps: int, deadline: float,
                device: str) -> list[dict]:
    """``specs``: (pattern, density, backend, fn, extras); the dense SDPA spec first. One warm-up (= first) call
    each, then interleaved rounds until ``deadline``. Failed calls become rows with the error as note."""
    runners, first, notes = {}, {}, {}
    for pattern, _, backend, fn, _ in specs:
        key = (pattern, backend)
        runner = make_runner(fn, q, k, v, "fwd")
        try:
            first[key] = first_call(runner, device)
            runners[key] = runner
        except Exception as exc:  # noqa: BLE001 (a failed backend is a row, not the end of the run)
            notes[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"
            if device == "cuda":
                torch.cuda.empty_cache()
    times = time_group(runners, reps, deadline, device) if runners else {}
    dense_key = (specs[0][0], specs[0][2])
    dense_ms = statistics.median(times[dense_key]) if times.get(dense_key) else None
    rows = []
    for pattern, density, backend, _, extras in specs:
        key = (pattern, backend)
        t = times.get(key) or None
        rows.append(extra_row(shape, section, pattern, density, backend, t, dense_ms, first.get(key),
                              notes.get(key, "" if t else "skipped: time budget"), **extras))
    return rows


def rectified_rows(key: str, args: argparse.Namespace, deadline: float) -> list[dict]:
    from vidattn.patterns.rectified import rectified_attention, rectified_plan, rectified_selection

    device, dtype = device_of(args), dtype_of(args)
    shape = reduced_rectified(SHAPES[key]) if args.dry_run else SHAPES[key]
    grid = (shape.frames, shape.height, shape.width)
    title = replace(shape, title=shape.title + ", rectified")
    note = _deadline_note(deadline)
    drops = args.drop_rates
    if note:
        return [extra_row(title, "rectified", "dense", 1.0, DENSE, None, None, note=note)] + [
            extra_row(title, "rectified", f"rectified drop {d:g}", 0.0, b, None, None, note=note)
            for d in drops for b in ("triton (selection+kernel)", "selection only")]
    q, k, v = make_inputs(shape, device, dtype)[:3]
    block = args.block
    backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"
    specs: list[tuple] = [("dense", 1.0, DENSE, dense_sdpa, {})]
    with torch.no_grad():
        for d in drops:
            try:  # density of the computed pairs (video rows: critical blocks; text rows: dense)
                density = float(rectified_plan(q, k, v, grid=grid, drop_rate=d, block_size=block)[0].density())
            except Exception:  # noqa: BLE001 (the timed call reports the error)
                density = 0.0
            if device == "cuda":  # autotune on 2 heads (the key ignores the head count)
                try:
                    rectified_attention(q[:, :2], k[:, :2], v[:, :2], grid=grid, drop_rate=d, block_size=block,
                                        backend=backend)
                except Exception:  # noqa: BLE001
                    pass
            specs.append((f"rectified drop {d:g}", density, "triton (selection+kernel)",
                          (lambda d: lambda q, k, v: rectified_attention(q, k, v, grid=grid, drop_rate=d,
                                                                         block_size=block, backend=backend))(d),
                          {"drop_rate": d}))
            specs.append((f"rectified drop {d:g}", density, "selection only",
                          (lambda d: lambda q, k, v: rectified_selection(q, k, v, grid=grid, drop_rate=d,
                                                                         block_size=block))(d),
                          {"drop_rate": d, "overhead": True}))
    rows = _time_extra(title, "rectified", specs, q, k, v, args.reps, deadline, device)
    del q, k, v
    return rows


def window_rows(key: str, order: str, args: argparse.Namespace, deadline: float) -> list[dict]:
    """Dense SDPA and the window in one order (``raster``: triton; ``tiled``: auto, i.e. flex on CUDA)."""
    from vidattn.kernels import sparse_attention
    from vidattn.kernels.dispatch import choose_backend
    from vidattn.layout import TokenLayout
    from vidattn.patterns.window import window_pattern, window_token_density
    from vidattn.token_order import sequence_permutation

    device, dtype = device_of(args), dtype_of(args)
    shape, base, tiles = (reduced_window(WINDOW_SHAPES[key]) if args.dry_run
                          else (WINDOW_SHAPES[key], WINDOW_BASE, WINDOW_TILES))
    if key == "freeswim-1080p" and not args.dry_run:
        shape = replace(shape, frames=args.window_frames, title=f"FreeSwim Wan 1088x1920 x {args.window_frames} "
                                                                f"latent frames")
    f, h, w = shape.frames, shape.height, shape.width
    tile_order = f"tiles{tiles[0]}x{tiles[1]}"
    layout = TokenLayout(f, h, w, order="raster" if order == "raster" else tile_order)
    raster = TokenLayout(f, h, w)
    token_density = window_token_density(raster, base_rows=base[0], base_cols=base[1])
    label = f"window {layout.order}"
    extras = {"order": layout.order, "token_density": token_density}
    need = args.flex_min_s if (order == "tiled" and device == "cuda") else 0.0
    note = _deadline_note(deadline, need)
    if note:
        return [extra_row(shape, "window", "dense", 1.0, DENSE, None, None, note=note),
                extra_row(shape, "window", label, 0.0, "-", None, None, note=note, **extras)]
    t0 = time.perf_counter()
    pattern = window_pattern(layout, base_rows=base[0], base_cols=base[1], block_size=args.block)
    extras["build_s"] = time.perf_counter() - t0
    pattern = pattern.to(device)
    q, k, v = make_inputs(shape, device, dtype)[:3]
    if order != "raster":
        perm = sequence_permutation(raster, tile_order)[0].to(device)
        q, k, v = (x.index_select(2, perm).contiguous() for x in (q, k, v))  # not timed
    if order == "raster":
        backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    else:
        backend = choose_backend(torch.device(device), pattern, shape.head_dim, dtype)
    if device == "cuda" and backend == "triton":
        try:
            with torch.no_grad():
                sparse_attention(q[:, :2], k[:, :2], v[:, :2], pattern, backend="triton")
        except Exception:  # noqa: BLE001 (the timed call reports the error)
            pass
    specs = [("dense", 1.0, DENSE, dense_sdpa, {}),
             (label, pattern.density(), backend,
              lambda q, k, v: sparse_attention(q, k, v, pattern, backend=backend), extras)]
    rows = _time_extra(shape, "window", specs, q, k, v, args.reps, deadline, device)
    del q, k, v
    return rows


def write_extra(extra: list[dict], args: argparse.Namespace) -> None:
    """Put the extra rows into gpu_bench.json (``extra_rows``, the main ``rows`` kept) and a section of
    gpu_bench.md after the main table (replacing an earlier section)."""
    os.makedirs(args.out, exist_ok=True)
    jpath, mpath = os.path.join(args.out, "gpu_bench.json"), os.path.join(args.out, "gpu_bench.md")
    try:
        with open(jpath) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"dry_run": args.dry_run, "rows": []}
    data["extra_rows"] = extra
    with open(jpath, "w") as f:
        json.dump(data, f, indent=1)
    main_md = _read(mpath).split("\n" + EXTRA_MARK)[0].rstrip("\n")
    lines = ["", EXTRA_MARK + " (forward; rectified: selection + kernel end to end, and the selection alone; "
             "window: FreeSwim's inward window, base 30x52, raster via triton, 8x16 tiles via auto)", "",
             "| section | shape | pattern | token density | density | backend | time (ms) | n | speedup vs "
             "SDPA flash | efficiency | build (s) | first call (s) | note |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in extra:
        lines.append(f"| {r['section']} | {r['title']} ({r['tokens']} tok, {r['heads']} heads) | {r['pattern']} | "
                     f"{fmt(r.get('token_density'), 4)} | {r['density']:.4f} | {r['backend']} | {fmt(r['ms'], 3)} | "
                     f"{r['n']} | {fmt(r['speedup'])} | {fmt(r['efficiency'])} | {fmt(r.get('build_s'), 2)} | "
                     f"{fmt(r['first_s'], 1)} | {r['note']} |")
    with open(mpath, "w") as f:
        f.write(main_md + "\n" + "\n".join(lines) + "\n")


def extra(args: argparse.Namespace) -> list[dict]:
    """The ``--extra`` rows, in order: rectified (Wan, HunyuanVideo), window raster (4K, 1080p), window tiled
    (4K, 1080p: a cold FlexAttention compile each, started only with ``--flex-min-s`` seconds left)."""
    device = device_of(args)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device (use --dry-run on CPU)")
    deadline = time.monotonic() + args.budget_s
    groups: list[tuple[str, Callable[[], list[dict]]]] = []
    if "rectified" in args.extra_rows:
        groups += [(f"rectified {key}", (lambda key: lambda: rectified_rows(key, args, deadline))(key))
                   for key in RECTIFIED_SHAPES]
    if "window" in args.extra_rows:
        for order in ("raster", "tiled"):
            groups += [(f"window {key} {order}",
                        (lambda key, order: lambda: window_rows(key, order, args, deadline))(key, order))
                       for key in ("freeswim-4k", "freeswim-1080p")]
    rows: list[dict] = []
    for name, run in groups:
        print(f"== extra: {name} ({deadline - time.monotonic():.0f} s of the budget left)", flush=True)
        try:
            group = run()
        except Exception as exc:  # noqa: BLE001 (one failed group is reported; the others still run)
            group = [{"section": name.split()[0], "shape": name, "title": name, "tokens": 0, "heads": 0,
                      "pattern": name, "density": 0.0, "backend": "-", "pass": "fwd", "ms": None, "n": 0,
                      "spread": None, "gflop": 0.0, "tflops": None, "dense_ms": None, "speedup": None,
                      "efficiency": None, "ratio": None, "first_s": None,
                      "note": f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}]
        rows += group
        for r in group:
            print(f"   {r['pattern']:<26} {r['backend']:<26} density {r['density']:.4f} "
                  f"{fmt(r['ms'], 3):>9} ms  speedup {fmt(r['speedup'])}  {r['note']}", flush=True)
        write_extra(rows, args)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------- ceilings
def ceilings(args: argparse.Namespace) -> None:
    """bf16 matmul TFLOP/s (n^3 product, random data) and device-to-device copy GB/s (bytes read + written)."""
    device = device_of(args)
    lines = []
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
                     f"capability {p.major}.{p.minor}, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
        try:
            import triton

            props = triton.runtime.driver.active.utils.get_device_properties(0)
            lines.append(f"triton device properties: {props}")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"triton device properties: unavailable ({exc})")
    n = 256 if args.dry_run else 8192
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    times = time_group({"mm": lambda: a @ b}, 10, math.inf, device)["mm"]
    ms = statistics.median(times)
    lines.append(f"CEILING matmul {str(dtype).split('.')[-1]} {n}^3: {2 * n**3 / (ms * 1e-3) / 1e12:.1f} TFLOP/s "
                 f"(median {ms:.3f} ms of 10, random data)")
    del a, b
    nbytes = (16 if args.dry_run else 2048) * 2**20
    x = torch.randn(nbytes // 4, device=device, generator=g)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    times = time_group({"copy": lambda: y.copy_(x)}, 10, math.inf, device)["copy"]
    ms = statistics.median(times)
    lines.append(f"CEILING copy {nbytes / 2**20:.0f} MiB: {2 * nbytes / (ms * 1e-3) / 1e9:.0f} GB/s "
                 f"(read + written, median {ms:.3f} ms of 10)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------- profile
def _device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        val = getattr(evt, attr, None)
        if val:
            return float(val)
    return 0.0


def profile_table(prof, device: str, top: int) -> tuple[str, float]:
    """Top entries by self device time (CUDA) or self CPU time (dry run) as a text table; total ms."""
    events = list(prof.key_averages())
    if device == "cuda":
        # Kernel entries only (device_type CUDA): a CPU op's own "self device time" would count its kernels twice.
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or events
        timed = [(e, _device_time(e)) for e in kernels]
        timed = [(e, t) for e, t in timed if t > 0]
    else:
        timed = [(e, float(e.self_cpu_time_total)) for e in events if e.self_cpu_time_total > 0]
    timed.sort(key=lambda et: -et[1])
    total = sum(t for _, t in timed) / 1e3
    lines = [f"{'kernel' if device == 'cuda' else 'op (CPU dry run)':<72} {'calls':>6} {'total ms':>10} "
             f"{'avg ms':>9} {'share':>6}"]
    for e, t in timed[:top]:
        lines.append(f"{e.key[:72]:<72} {e.count:>6} {t / 1e3:>10.3f} {t / 1e3 / max(e.count, 1):>9.3f} "
                     f"{t / 1e3 / total if total else 0:>6.1%}")
    lines.append(f"{'(all ' + str(len(timed)) + ' entries)':<72} {'':>6} {total:>10.3f}")
    return "\n".join(lines), total


def _compiled(fn) -> list:
    """Compiled kernels held by a triton JITFunction (all devices), across triton versions."""
    out = []
    caches = getattr(fn, "device_caches", None)
    if caches:
        for entry in list(caches.values()):
            cache = entry[0] if isinstance(entry, tuple) else entry
            out += list(cache.values())
    elif isinstance(getattr(fn, "cache", None), dict):
        for cache in fn.cache.values():
            out += list(cache.values())
    return out


def _constants(fn, kern) -> dict:
    consts = getattr(getattr(kern, "src", None), "constants", None) or {}
    names = getattr(fn, "arg_names", [])
    out = {}
    for k, v in consts.items():
        idx = k[0] if isinstance(k, tuple) and k else k
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        out[name] = getattr(v, "value", v)
    return out


def kernel_resources() -> str:
    """Registers, spills and shared memory of every compiled triton kernel of this process (they all ran:
    autotuning launches each candidate); ``*`` marks the autotuner's choices."""
    from vidattn.kernels import triton_attention as ta
    from vidattn.kernels import triton_bwd, triton_fwd

    if getattr(ta, "INTERPRETING", False):
        return "compiled-kernel resources: none (TRITON_INTERPRET=1: the kernels ran in the interpreter)"
    chosen = set()
    for kind, tuner in getattr(ta, "_TUNED", {}).items():
        for cfg in getattr(tuner, "cache", {}).values():
            kw = getattr(cfg, "kwargs", {})
            chosen.add((kind, kw.get("BLOCK_M"), kw.get("BLOCK_N"), cfg.num_warps, cfg.num_stages))
    fns = {"fwd": triton_fwd.sparse_fwd_kernel, "dkdv": triton_bwd.sparse_bwd_dkdv_kernel,
           "dq": triton_bwd.sparse_bwd_dq_kernel, "delta": triton_bwd.bwd_delta_kernel}
    lines = [f"{'kernel':<6} {'tile':>8} {'warps':>5} {'stages':>6} {'regs':>5} {'spills':>6} {'smem B':>7} "
             f"{'flags':<44} tuned"]
    for kind, fn in fns.items():
        for kern in _compiled(fn):
            try:
                if hasattr(kern, "result"):  # a FutureKernel of triton's async compile mode
                    kern = kern.result()
                if getattr(kern, "module", None) is None and hasattr(kern, "_init_handles"):
                    kern._init_handles()
                md = kern.metadata
                c = _constants(fn, kern)
                tile = f"{c.get('BLOCK_M', '?')}x{c.get('BLOCK_N', '?')}"
                flags = " ".join(f"{f}={c[f]}" for f in ("HEAD_DIM", "HAS_PRED", "HAS_KVLENS", "HAS_LSE", "HAS_EPI")
                                 if f in c)
                tuned = "*" if (kind, c.get("BLOCK_M"), c.get("BLOCK_N"), md.num_warps, md.num_stages) in chosen \
                    else ""
                lines.append(f"{kind:<6} {tile:>8} {md.num_warps:>5} {md.num_stages:>6} "
                             f"{getattr(kern, 'n_regs', '?'):>5} {getattr(kern, 'n_spills', '?'):>6} "
                             f"{getattr(md, 'shared', '?'):>7} {flags:<44} {tuned}")
            except Exception as exc:  # noqa: BLE001
                lines.append(f"{kind:<6} (unreadable: {type(exc).__name__}: {exc})")
    return "compiled-kernel resources (every kernel compiled in this process; * = autotuner's choice):\n" + \
        "\n".join(lines)


def profile(args: argparse.Namespace) -> int:
    """Writes profile.txt: the per-kernel tables, then the compiled-kernel resources; returns 1 if a part failed."""
    device, dtype = device_of(args), dtype_of(args)
    key = args.shapes[0]
    shape = reduced(SHAPES[key]) if args.dry_run else SHAPES[key]
    q, k, v, grad = make_inputs(shape, device, dtype)
    name, pattern = build_patterns(shape, args.block, [], device)[0]
    out = [f"# Per-kernel profile: one forward+backward, {shape.title} ({shape.seq_len} tokens, {shape.heads} heads, "
           f"d={shape.head_dim}), {name} pattern (density {pattern.density():.3f})", ""]
    failed = False
    try:
        pretune(pattern, q, k, v, grad, min(args.tune_heads, shape.heads), device)
    except Exception as exc:  # noqa: BLE001
        out.append(f"triton autotune FAILED: {type(exc).__name__}: {exc}")
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for label, fn in (("triton " + name, triton_backend(pattern)), (DENSE + " (dense)", dense_sdpa)):
        try:
            run = make_runner(fn, q, k, v, "fwd+bwd", grad)
            run()
            sync(device)
            t0 = time.perf_counter()
            with torch_profile(activities=activities) as prof:
                run()
                sync(device)
            wall = (time.perf_counter() - t0) * 1e3
            table, total = profile_table(prof, device, 12 if label.startswith("triton") else 5)
            out += [f"## {label} fwd+bwd: kernel time {total:.2f} ms, wall {wall:.2f} ms (profiled)", table, ""]
        except Exception as exc:  # noqa: BLE001
            failed = True
            out += [f"## {label} fwd+bwd: FAILED {type(exc).__name__}: {exc}", ""]
    try:
        out.append(kernel_resources())
    except Exception as exc:  # noqa: BLE001
        failed = True
        out.append(f"compiled-kernel resources: FAILED {type(exc).__name__}: {exc}")
    text = "\n".join(out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- summary
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def extra_summary(extra_rows: list[dict]) -> list[str]:
    """The summary lines of the ``--extra`` rows: per row its time against SDPA flash of the same rounds."""
    if not extra_rows:
        return ["", "extra rows (rectified, window): none (step skipped, failed or timed out before the first row)"]
    lines = ["", "extra rows, fwd (speedup = SDPA flash time / time; selection: its time as a share of SDPA flash):"]
    for r in extra_rows:
        if r.get("backend") == DENSE:
            continue
        head = f"{r.get('section', '?'):<9} {r.get('shape', '?'):<15} {r.get('pattern', '?'):<22} " \
               f"{r.get('backend', '?'):<26}"
        if r.get("ms") is None:
            lines.append(f"{head} {r.get('note') or 'no time'}")
            continue
        dense = r.get("dense_ms")
        if r.get("overhead"):
            share = f"{100 * r['ms'] / dense:.1f} % of sdpa" if dense else "-"
            lines.append(f"{head} {r['ms']:8.2f} ms  {share}")
        else:
            dens = f"density {r['density']:.3f}" + (f" (token {r['token_density']:.3f})"
                                                     if r.get("token_density") is not None else "")
            lines.append(f"{head} {r['ms']:8.2f} ms  sdpa {fmt(dense)} ms  speedup {fmt(r.get('speedup'))}x  "
                         f"{dens}")
    return lines


def summary(args: argparse.Namespace) -> str:
    """The closing table of gpu_check.sh, from the files under ``args.out`` (no torch needed)."""
    out = args.out
    lines = ["", "=" * 100, "GPU CHECK SUMMARY" + (" (DRY RUN: CPU, interpreter, tiny sizes; times mean nothing)"
                                                  if args.dry_run else "")]
    if args.steps:
        lines.append("steps: " + args.steps)
    env = _read(os.path.join(out, "environment.txt"))
    for m in re.finditer(r"^CEILING (.*)$", env, re.M):
        lines.append("ceiling: " + m.group(1))
    val = _read(os.path.join(out, "validate.txt"))
    m = re.search(r"^VALIDATION (.*)$", val, re.M)
    lines.append("validation: " + (m.group(1) if m else "no result line (step failed or timed out early)"))
    for m in re.finditer(r"^COVERAGE (.*)$", val, re.M):
        lines.append("  coverage: " + m.group(1))
    fails = re.findall(r"^RUN .* FAIL.*$", val, re.M)
    for f in fails[:5]:
        lines.append("  " + f[:150])
    pre = _read(os.path.join(out, "precompile.txt"))
    flex = re.findall(r"^FLEX_COMPILE (\S+) (\S+) (\S+)", pre, re.M)
    if flex:
        lines.append("flex compile, cold (precompile step, parallel with other compiles): " +
                     ", ".join(f"{s} {p} {t} s" for s, p, t in flex))
    try:
        with open(os.path.join(out, "gpu_bench.json")) as f:
            data = json.load(f)
        rows, extra_rows = data.get("rows", []), data.get("extra_rows", [])
    except (OSError, ValueError, AttributeError):
        rows, extra_rows = [], []
    if rows:
        firsts = [f"{r['shape']} {r['pass']} {r['first_s']:.1f} s" for r in rows
                  if r["backend"] == FLEX and r["first_s"] is not None and r["pattern"] == rows[0]["pattern"]]
        if firsts:
            lines.append("flex first call in the benchmark (dynamo + inductor cache): " + ", ".join(firsts))
        lines += ["", "targets: fwd efficiency >= 0.9, fwd+bwd efficiency >= 0.7 (efficiency = speedup vs SDPA flash"
                  " x density); all-ones: triton time within 10 % of SDPA flash (time / dense <= 1.10)", "",
                  f"{'shape':<8} {'pattern':<11} {'dens':>5} | {'fwd: triton':>11} {'sdpa':>8} {'flex':>8} "
                  f"{'eff':>5} {'flexeff':>7} | {'f+b: triton':>11} {'sdpa':>8} {'flex':>8} {'eff':>5} "
                  f"{'flexeff':>7} | verdict"]
        index = {(r["shape"], r["pattern"], r["backend"], r["pass"]): r for r in rows}
        seen = []
        for r in rows:
            if (r["shape"], r["pattern"]) not in seen:
                seen.append((r["shape"], r["pattern"]))
        for shp, pat in seen:
            cells, verdict = [], []
            dens = next(r["density"] for r in rows if r["shape"] == shp and r["pattern"] == pat)
            for pass_, target in (("fwd", 0.9), ("fwd+bwd", 0.7)):
                t = index.get((shp, pat, TRITON, pass_), {})
                d = index.get((shp, pat, DENSE, pass_), {})
                fl = index.get((shp, pat, FLEX, pass_), {})
                cells.append(f"{fmt(t.get('ms'), 2):>11} {fmt(d.get('ms'), 2):>8} {fmt(fl.get('ms'), 2):>8} "
                             f"{fmt(t.get('efficiency')):>5} {fmt(fl.get('efficiency')):>7}")
                if pat == "all-ones":
                    ratio = t.get("ratio")
                    verdict.append(f"{pass_} time/sdpa {fmt(ratio)}" +
                                   ("" if ratio is None else (" ok" if ratio <= 1.10 else " MISS")))
                elif t.get("efficiency") is not None:
                    verdict.append(f"{pass_} " + ("ok" if t["efficiency"] >= target else "MISS"))
            lines.append(f"{shp:<8} {pat:<11} {dens:>5.3f} | " + " | ".join(cells) + " | " + ", ".join(verdict))
        skipped = sum(1 for r in rows if r["ms"] is None)
        if skipped:
            lines.append(f"({skipped} benchmark rows without a time: skipped by the time budget or failed; see "
                         "gpu_bench.md)")
    else:
        lines.append("benchmark: no rows (step failed or timed out before the first row)")
    lines += extra_summary(extra_rows)
    prof = _read(os.path.join(out, "profile.txt"))
    m = re.search(r"^## triton .*$", prof, re.M)
    if m:
        lines.append("profile: " + m.group(0)[3:])
    lines.append("=" * 100)
    text = "\n".join(lines)
    with open(os.path.join(out, SUMMARY_FILE), "w") as f:
        f.write(text.lstrip("\n") + "\n")
    return text


# ---------------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ceilings", action="store_true", help="measure bf16 matmul and copy ceilings, then exit")
    mode.add_argument("--profile", action="store_true", help="per-kernel profile + compiled-kernel resources")
    mode.add_argument("--summary", action="store_true", help="print (and write) gpu_check's summary from --out")
    mode.add_argument("--extra", action="store_true",
                      help="the extra forward rows (rectified SpaAttn, FreeSwim window), added to gpu_bench.md/.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (triton interpreter)")
    parser.add_argument("--shapes", default="hunyuan,wan", help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--densities", default=None,
                        help="densities of the random block patterns (default 0.1,0.25,0.5; 0.25 dry run)")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of " + ",".join(PASSES))
    parser.add_argument("--block", type=int, default=None, help="pattern block size (default 128; 64 dry run)")
    parser.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 3; 1 dry run)")
    parser.add_argument("--tune-heads", type=int, default=2, help="heads of the autotuning copy of the inputs")
    parser.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget of the benchmark")
    parser.add_argument("--shape-reserve-s", type=float, default=40.0,
                        help="seconds of the budget kept for each shape after the current one")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--extra-rows", default=",".join(EXTRA_SECTIONS),
                        help="(--extra) comma list of " + ",".join(EXTRA_SECTIONS))
    parser.add_argument("--drop-rates", default=",".join(map(str, DEFAULT_DROP_RATES)),
                        help="(--extra) rectified drop rates (default 0.75,0.9)")
    parser.add_argument("--window-frames", type=int, default=21,
                        help="(--extra) latent frames of the FreeSwim 1080p window rows (default 21 = 81 frames)")
    parser.add_argument("--flex-min-s", type=float, default=40.0,
                        help="(--extra) budget seconds left needed to start a tiled-window row (a cold "
                             "FlexAttention compile)")
    parser.add_argument("--steps", default="", help="(--summary) the step status line of gpu_check.sh")
    parser.add_argument("--out", default=os.environ.get("OUT") or "./gpu_check_out",
                        help="folder for the output files (default: $OUT, else ./gpu_check_out)")
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    densities = args.densities or ("0.25" if args.dry_run else ",".join(map(str, DEFAULT_DENSITIES)))
    args.densities = [float(d) for d in densities.split(",") if d.strip()]
    args.block = args.block or (64 if args.dry_run else 128)
    args.reps = args.reps or (1 if args.dry_run else 3)
    for s in args.shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for p in args.passes:
        if p not in PASSES:
            parser.error(f"unknown pass {p!r}; choose from {', '.join(PASSES)}")
    if any(not 0 < d <= 1 for d in args.densities):
        parser.error("densities must lie in (0, 1]")
    args.extra_rows = [x.strip() for x in args.extra_rows.split(",") if x.strip()]
    for x in args.extra_rows:
        if x not in EXTRA_SECTIONS:
            parser.error(f"unknown extra rows {x!r}; choose from {', '.join(EXTRA_SECTIONS)}")
    try:
        args.drop_rates = [float(d) for d in args.drop_rates.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--drop-rates must be a comma list of numbers in [0, 1), got {args.drop_rates!r}")
    if not args.drop_rates or any(not 0 <= d < 1 for d in args.drop_rates):
        parser.error("--drop-rates must lie in [0, 1)")
    if args.window_frames < 1:
        parser.error("--window-frames must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        print(summary(args), flush=True)
        return 0
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.ceilings:
        ceilings(args)
        return 0
    if args.profile:
        return profile(args)
    if args.extra:
        rows = extra(args)
        failed = [r for r in rows if r["note"].startswith("FAILED") or (
            r["note"] and not r["note"].startswith("skipped") and r["backend"] not in (FLEX, "-"))]
        print(f"gpu_bench --extra: {len(rows)} rows, {sum(r['ms'] is not None for r in rows)} timed, "
              f"{len(failed)} failed (a failed FlexAttention row is reported, not counted)", flush=True)
        return 1 if failed else 0
    rows = benchmark(args)
    failed = [r for r in rows if r["note"] and not r["note"].startswith("skipped") and r["backend"] != FLEX]
    print(f"gpu_bench: {len(rows)} rows, {sum(r['ms'] is not None for r in rows)} timed, {len(failed)} failed "
          "(triton / dense; a failed FlexAttention row is reported, not counted)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
