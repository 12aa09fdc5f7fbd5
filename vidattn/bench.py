"""Attention benchmark: sparse backends against dense SDPA on the same q, k, v, timed interleaved in one process.

Efficiency = speedup x density: 1.0 means the sparse kernel computes its blocks as fast as dense attention computes
everything; it is the figure that tells kernel quality apart from pattern sparsity.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels import BlockPattern, sparse_attention
from .layout import TokenLayout

__all__ = ["GEOMETRIES", "cpu_name", "BenchRow", "band_pattern", "random_pattern", "bench_pattern", "masked_sdpa_rows",
           "time_attention"]

# Latent token grids (frames, height, width) after patching.
GEOMETRIES = {
    "wan-1.3b-480p": (21, 30, 52),   # Wan2.1 1.3B, 480x832, 81 frames
    "wan-720p": (21, 45, 80),        # Wan2.1 14B, 720x1280, 81 frames
    "hunyuan-720p": (32, 45, 80),    # HunyuanVideo, 720x1280, 125 frames (text not included)
    "bench-16k": (8, 32, 64),        # 16,384 tokens
}


def band_pattern(seq_len: int, density: float, block_size: int = 128) -> BlockPattern:
    """Block band ``|r - c| <= w`` with the smallest ``w`` whose density reaches ``density``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    n = -(-seq_len // block_size)
    r = torch.arange(n)
    dist = (r[:, None] - r[None, :]).abs()
    for w in range(n):
        mask = dist <= w
        pattern = BlockPattern.from_block_mask(mask, q_len=seq_len, kv_len=seq_len, block_q=block_size)
        if pattern.density() >= density:
            return pattern
    return BlockPattern.full(seq_len, block_q=block_size)


def random_pattern(seq_len: int, density: float, block_size: int = 128, seed: int = 0) -> BlockPattern:
    """Random blocks at ``density`` (the diagonal always kept)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    n = -(-seq_len // block_size)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, n, generator=g) < density) | torch.eye(n, dtype=torch.bool)
    return BlockPattern.from_block_mask(mask, q_len=seq_len, kv_len=seq_len, block_q=block_size)


def bench_pattern(kind: str, layout: TokenLayout, *, density: float = 0.25, block_size: int = 128,
                  **knobs) -> BlockPattern:
    """``full``, ``band``, ``random`` or ``radial`` (knobs go to ``radial_pattern``)."""
    if kind == "full":
        return BlockPattern.full(layout.seq_len, block_q=block_size)
    if kind == "band":
        return band_pattern(layout.seq_len, density, block_size)
    if kind == "random":
        return random_pattern(layout.seq_len, density, block_size)
    if kind == "radial":
        from .patterns import radial_pattern

        return radial_pattern(layout, block_size=block_size, **knobs)
    raise ValueError(f"pattern must be one of full, band, random, radial; got {kind!r}")


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class BenchRow:
    name: str
    seconds: float
    density: float
    dense_seconds: float
    rel_error: Optional[float] = None  # ||out - dense|| / ||dense|| (``time_attention(..., qkv=...)``)

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.seconds

    @property
    def efficiency(self) -> float:
        return self.speedup * self.density


def masked_sdpa_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern,
                     rows: torch.Tensor) -> torch.Tensor:
    """Dense SDPA under the pattern's exact boolean mask, for query ``rows`` only: ``(B, H, len(rows), Dv)``.

    The test-style reference at benchmark sizes, where the whole ``S x S`` mask would not fit. Patterns shared by
    the batch and heads (``groups == (1, 1)``); partial blocks apply the predicate, ``kv_lens`` mask padded keys.
    A row that attends nothing outputs 0, as the backends do.
    """
    if pattern.groups != (1, 1):
        raise ValueError(f"masked_sdpa_rows takes batch- and head-shared patterns, got groups {pattern.groups}")
    rows = rows.to(q.device)
    qb = rows // pattern.block_q
    keys = torch.arange(pattern.kv_len, device=q.device)
    kb = keys // pattern.block_kv
    mask = pattern.block_bitmap()[0, 0][qb][:, kb]
    if pattern.partial is not None:
        partial = pattern.partial_bitmap()[0, 0][qb][:, kb]
        mask = mask & (~partial | pattern.predicate(rows[:, None], keys[None, :]))
    mask = mask[None, None]
    if pattern.kv_lens is not None:
        mask = mask & (keys[None, :] < pattern.kv_lens[:, None].to(q.device))[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask).nan_to_num(0.0)


def _timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_attention(pattern: BlockPattern, *, heads: int, head_dim: int, backends: list[str], repeats: int = 3,
                   warmup: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   check: bool = True, seed: int = 0,
                   qkv: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                   ) -> tuple[list[BenchRow], dict]:
    """Median time of dense SDPA and each backend on the same q, k, v; runs interleaved (dense, b1, b2, ...).

    q, k, v are Gaussian (``seed``) unless ``qkv`` gives them (e.g. :func:`vidattn.fidelity.structured_qkv`); then
    each row also carries ``rel_error``, the relative L2 error of its first output against dense SDPA in fp32.
    With ``check`` the first run of every backend is compared with SDPA under the pattern's boolean mask on 256
    sampled query rows (max abs difference reported in the second return value).
    """
    g = torch.Generator().manual_seed(seed)
    s = pattern.q_len
    if qkv is None:
        q, k, v = (torch.randn(1, heads, s, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    else:
        q, k, v = (t.to(device=device, dtype=dtype) for t in qkv)
        if q.shape[2] != s:
            raise ValueError(f"qkv has {q.shape[2]} tokens but the pattern {s}")
    pattern = pattern.to(device)
    fns: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name in backends:
        fns[name] = (lambda n: lambda: sparse_attention(q, k, v, pattern, backend=n))(name)
    errors: dict = {}
    with torch.inference_mode():
        outs = {name: fn() for name, fn in fns.items() for _ in range(max(warmup, 1))}
        if check:
            rows = torch.randperm(s, generator=g)[:256].sort().values
            ref = masked_sdpa_rows(q, k, v, pattern, rows).float()
            errors = {n: float((o[:, :, rows.to(o.device)].float() - ref).abs().max())
                      for n, o in outs.items() if n != "dense"}
        rel: dict[str, float] = {}
        if qkv is not None:
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).double()
            rel = {n: float((o.double() - exact).norm() / exact.norm()) for n, o in outs.items()}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_timed(fn))
    dense = statistics.median(times["dense"])
    density = pattern.density()
    rows = [BenchRow(name, statistics.median(t), 1.0 if name == "dense" else density, dense, rel.get(name))
            for name, t in times.items()]
    return rows, errors
