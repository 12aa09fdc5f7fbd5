"""Benchmark the triton block-sparse backend against compiled FlexAttention and dense flash SDPA (bf16, CUDA).

For each video shape (Wan2.1-1.3B 480p x 81 frames; HunyuanVideo 720p x 125 frames + 256 text tokens) and each
block pattern (band and per-head random at several densities, the all-ones pattern, the radial pattern when
``vidattn.patterns.radial_pattern`` is available) it times forward and forward+backward with CUDA events (warm-up,
then the median of ``--reps`` runs) and reports

    TFLOP/s   = flops / time, flops = 4 * B * H * D * pairs (forward), 3.5x that for forward+backward
                (backward = 2.5 forwards, FlashAttention's convention); pairs = density * S_q * S_kv, i.e. the
                token pairs of the listed blocks, which is what the sparse kernels compute
    speedup   = dense time / time     (dense: flash SDPA on the same inputs)
    efficiency = speedup * density    (1.0: time shrinks exactly with the computed fraction)

``--dry-run`` builds the shapes and patterns at reduced size on the CPU and prints the planned rows (no timing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from vidattn.kernels import BlockPattern, sparse_attention


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

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text


SHAPES = {
    "wan": Shape("wan", "Wan2.1-1.3B 480p x 81f", 1, 12, 128, 21, 30, 52),
    "hunyuan": Shape("hunyuan", "HunyuanVideo 720p x 125f", 1, 24, 128, 32, 45, 80, 256),
}
PASSES = ("fwd", "fwd+bwd")
DEVICE = "cuda"


def reduced(shape: Shape) -> Shape:
    """The dry-run stand-in: about a thousand tokens, two heads."""
    return replace(shape, heads=2, head_dim=32, frames=min(shape.frames, 5), height=max(2, shape.height // 3),
                   width=max(2, shape.width // 3), text=min(shape.text, 32))


def band_mask(nb: int, density: float) -> torch.Tensor:
    """``|i - j| <= r`` with the half-width r whose block density is closest to ``density``."""
    def band_density(r: int) -> float:  # nb diagonal blocks plus 2 * sum_{i<=r} (nb - i) off-diagonal ones
        return (nb + 2 * r * nb - r * (r + 1)) / nb ** 2

    best = min(range(nb), key=lambda r: abs(band_density(r) - density))
    idx = torch.arange(nb)
    return (idx[:, None] - idx[None, :]).abs() <= best


def random_mask(nb: int, heads: int, density: float, seed: int = 0) -> torch.Tensor:
    """Per-head Bernoulli(density) blocks, diagonal always kept (so every query attends somewhere)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, heads, nb, nb, generator=g) < density
    return mask | torch.eye(nb, dtype=torch.bool)


def radial(shape: Shape, block: int) -> BlockPattern | None:
    """``vidattn.patterns.radial_pattern`` for the shape, or None when that module is not importable."""
    try:
        from vidattn.layout import TextSegment, TokenLayout
        from vidattn.patterns import radial_pattern
    except ImportError:
        return None
    text = TextSegment(shape.text, "last") if shape.text else None
    return radial_pattern(TokenLayout(shape.frames, shape.height, shape.width, text=text), block_size=block)


def build_patterns(shape: Shape, block: int, densities: list[float], device: str) -> list[tuple[str, BlockPattern]]:
    s = shape.seq_len
    nb = -(-s // block)
    out = []
    for d in densities:
        out.append((f"band {d:.0%}", BlockPattern.from_block_mask(band_mask(nb, d), q_len=s, kv_len=s, block_q=block)))
        out.append((f"random/head {d:.0%}", BlockPattern.from_block_mask(
            random_mask(nb, shape.heads, d), q_len=s, kv_len=s, block_q=block)))
    out.append(("all-ones", BlockPattern.full(s, block_q=block)))
    try:
        rad = radial(shape, block)
    except (TypeError, ValueError) as exc:
        print(f"radial pattern unavailable for {shape.key}: {exc}", file=sys.stderr)
        rad = None
    if rad is not None:
        out.append(("radial", rad))
    return [(name, p.to(device)) for name, p in out]


def flops(shape: Shape, pairs: float, pass_: str) -> float:
    fwd = 4.0 * shape.batch * shape.heads * shape.head_dim * pairs
    return fwd if pass_ == "fwd" else 3.5 * fwd


def time_ms(fn: Callable[[], object], warmup: int, reps: int, slow_ms: float = 500.0) -> float:
    """Median CUDA-event time of ``fn`` after ``warmup`` calls (3 timed calls at most when one takes > slow_ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < (reps if not times or times[0] < slow_ms else min(reps, 3)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_runner(attn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pass_: str) -> Callable:
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return attn(q, k, v)
        return run
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def run_bwd():
        out = attn(*leaves)
        return torch.autograd.grad(out, leaves, grad)
    return run_bwd


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def triton_backend(pattern: BlockPattern) -> Callable:
    return lambda q, k, v: sparse_attention(q, k, v, pattern, backend="triton")


def flex_backend(pattern: BlockPattern, flex_fn: Callable) -> Callable:
    block_mask = pattern.to_block_mask()
    return lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask)


def row(shape: Shape, pattern: str, density: float, backend: str, pass_: str, ms: float | None = None,
        dense_ms: float | None = None, note: str = "") -> dict:
    pairs = density * shape.seq_len * shape.seq_len
    r = {"shape": shape.title, "tokens": shape.seq_len, "heads": shape.heads, "pattern": pattern,
         "density": density, "backend": backend, "pass": pass_, "gflop": flops(shape, pairs, pass_) / 1e9,
         "ms": ms, "tflops": None, "speedup": None, "efficiency": None, "note": note}
    if ms:
        r["tflops"] = flops(shape, pairs, pass_) / (ms * 1e-3) / 1e12
        if dense_ms:
            r["speedup"] = dense_ms / ms
            r["efficiency"] = r["speedup"] * density
    return r


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], header: str) -> str:
    columns = ("| shape | pattern | density | backend | pass | time (ms) | TFLOP/s | speedup vs dense | efficiency "
               "| note |")
    lines = [header, "", columns, "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['tokens']} tok, {r['heads']} heads) | {r['pattern']} | "
                     f"{r['density']:.3f} | {r['backend']} | {r['pass']} | {fmt(r['ms'])} | {fmt(r['tflops'], 1)} | "
                     f"{fmt(r['speedup'])} | {fmt(r['efficiency'])} | {r['note']} |")
    return "\n".join(lines) + "\n"


def dry_run(args: argparse.Namespace) -> None:
    rows = []
    for key in args.shapes:
        shape = reduced(SHAPES[key])
        rows += [row(shape, "dense", 1.0, "dense flash SDPA", pass_, note="planned") for pass_ in args.passes]
        patterns = build_patterns(shape, 32, args.densities, "cpu")
        for backend in ("triton",) + (() if args.no_flex else ("flex (compiled)",)):
            for name, pattern in patterns:
                rows += [row(shape, name, pattern.density(), backend, pass_, note="planned") for pass_ in args.passes]
    full = "; ".join(f"{s.title}: B={s.batch}, {s.seq_len} tokens ({s.video_tokens} video + {s.text} text), "
                     f"{s.heads} heads, d={s.head_dim}" for s in (SHAPES[key] for key in args.shapes))
    print(markdown(rows, f"# gpu_bench dry run (reduced shapes, CPU, nothing timed)\n\nOn CUDA: {full}; "
                         f"blocks {args.block}; passes {', '.join(args.passes)}."))


def benchmark(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device (use --dry-run on CPU)")
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex_fn = torch.compile(flex_attention, dynamic=False)
    rows: list[dict] = []
    start = time.monotonic()
    for i, key in enumerate(args.shapes):
        shape = SHAPES[key]
        # Each shape gets an equal share of what is left of the budget.
        deadline = time.monotonic() + (args.budget_s - (time.monotonic() - start)) / (len(args.shapes) - i)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, device=DEVICE,
                               dtype=torch.bfloat16, generator=g) for _ in range(3))
        patterns = [(name, p, p.density()) for name, p in build_patterns(shape, args.block, args.densities, DEVICE)]
        # Dense first (the speedup baseline), then triton on every pattern, then FlexAttention: if the budget runs
        # out, the rows cut are the comparison ones.
        jobs = [("dense", 1.0, "dense flash SDPA", lambda: dense_sdpa)]
        jobs += [(name, d, "triton", lambda p=p: triton_backend(p)) for name, p, d in patterns]
        if flex_fn is not None:
            jobs += [(name, d, "flex (compiled)", lambda p=p: flex_backend(p, flex_fn)) for name, p, d in patterns]
        dense_ms: dict[str, float] = {}
        for name, density, backend, make in jobs:
            for pass_ in args.passes:
                if time.monotonic() > deadline:
                    rows.append(row(shape, name, density, backend, pass_, note="skipped: time budget"))
                    continue
                try:
                    ms = time_ms(make_runner(make(), q, k, v, pass_), args.warmup, args.reps)
                    note = ""
                except Exception as exc:  # noqa: BLE001 (a failed backend is a table row, not the end of the run)
                    ms, note = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                    torch.cuda.empty_cache()
                if backend == "dense flash SDPA" and ms:
                    dense_ms[pass_] = ms
                rows.append(row(shape, name, density, backend, pass_, ms, dense_ms.get(pass_), note))
                print(markdown(rows[-1:], "").splitlines()[-1], flush=True)
                write_tables(rows, args)
        del q, k, v, patterns, jobs
        torch.cuda.empty_cache()
    return rows


def write_tables(rows: list[dict], args: argparse.Namespace) -> str:
    """(Re)write gpu_bench.md and gpu_bench.json under ``args.out`` (after every row, so a killed run keeps its
    rows); returns the markdown."""
    import triton

    header = (f"# Block-sparse attention benchmark (bf16)\n\n"
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}; median of up to {args.reps} runs after {args.warmup} warm-up; blocks "
              f"{args.block}x{args.block}. TFLOP/s count the listed blocks only (forward 4·B·H·D·pairs, fwd+bwd 3.5x); "
              "efficiency = speedup x density.")
    table = markdown(rows, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="build reduced shapes/patterns on CPU, print the plan")
    parser.add_argument("--shapes", default="wan,hunyuan", help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--densities", default="0.1,0.25,0.5", help="block densities of the band/random patterns")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of " + ",".join(PASSES))
    parser.add_argument("--block", type=int, default=128, help="pattern block size (tokens)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (compile, autotune)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls; the median is reported")
    parser.add_argument("--budget-s", type=float, default=170.0, help="wall-clock budget; later rows are skipped")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--out", default=os.environ.get("OUT") or "./gpu_check_out",
                        help="folder for gpu_bench.md / gpu_bench.json (default: $OUT, else ./gpu_check_out)")
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for p in args.passes:
        if p not in PASSES:
            parser.error(f"unknown pass {p!r}; choose from {', '.join(PASSES)}")
    if any(not 0 < d <= 1 for d in args.densities):
        parser.error("densities must lie in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0
    rows = benchmark(args)
    print("\n" + write_tables(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
