"""Cuts a block pattern into the CPU backend's kernel calls: dense rectangles of query rows x a key run.

The CPU flash kernel computes a rectangle faster the more query rows it holds (single thread, fp32, d = 64, 2-core
Xeon: 128 rows ~68, 256 ~75, 512 ~79, 1024 or more ~105 GFLOP/s) and each call has a fixed cost, so a pattern is
cheapest as few, tall rectangles. The query blocks are cut into strips of ``~1024 / block_q`` blocks; a strip is
cut level by level: at height ``h`` each aligned group of ``h`` rows gives one rectangle per key run that all its
rows still hold (at least ``min_width`` keys wide, or the whole key axis), the cells left go to the next, lower
level, and height 1 takes each row's remaining runs. Per strip the ladder of heights with the lowest modelled cost
wins, plain rows included:

    cost(rect) = q_rows * keys / rate(q_rows) + CALL_COST

so band patterns keep one call per row while the wide near-diagonal runs of a radial pattern go 1024 queries at a
time. Rectangles cover every listed full block exactly once; partial blocks (token predicate) are left to the
caller as per-row runs. Pure functions of the pattern's structure, memoised on it.
"""
from __future__ import annotations

import numpy as np

from .pattern import BlockPattern

__all__ = ["Rect", "plan_rects", "strip_rects", "rect_cost"]

Rect = tuple[int, int, int, int]  # (q0, q1, k0, k1) in tokens, end exclusive

# Relative throughput of the CPU flash kernel by query rows per call (measured, see the module docstring).
_RATE = ((1024, 1.0), (512, 0.76), (256, 0.71), (0, 0.65))
# Fixed cost of one call (argument checks, buffers, merge) in token pairs: about 20 us at ~100 GFLOP/s, d = 64.
CALL_COST = 8192
_STRIP_QUERIES = 1024
_MIN_WIDTHS = (256, 512)  # tokens


def rect_cost(q_rows: int, keys: int) -> float:
    """Modelled cost of one call, in token pairs at the kernel's best rate."""
    rate = next(r for rows, r in _RATE if q_rows >= rows)
    return q_rows * keys / rate + CALL_COST


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _ladder_rects(strip: np.ndarray, heights: tuple[int, ...], min_width: int) -> list[tuple[int, int, int, int]]:
    """Block rectangles ``(r0, r1, c0, c1)`` (strip-relative rows) covering ``strip`` exactly, level by level."""
    left = strip.copy()
    rects = []
    for h in heights:
        for r0 in range(0, left.shape[0], h):
            rows = left[r0:r0 + h]
            if h == 1:
                runs = _runs(rows[0])
            else:
                runs = [(c0, c1) for c0, c1 in _runs(rows.all(0)) if c1 - c0 >= min_width]
            for c0, c1 in runs:
                rects.append((r0, r0 + rows.shape[0], c0, c1))
                rows[:, c0:c1] = False
    return rects


def strip_rects(strip: np.ndarray, *, q0: int, q_len: int, block_q: int, kv_len: int, block_kv: int) -> list[Rect]:
    """The cheapest exact cover of one strip (boolean ``(rows, nk)`` of full blocks, first row at token ``q0``)."""
    top = strip.shape[0]
    ladders = [(1,)]
    if top >= 2:
        half = max(top // 2, 2)
        ladders += [(top, 1), (top, half, 1), (half, 1)] if half < top else [(top, 1)]
    best, best_cost = None, float("inf")
    for heights in ladders:
        for width in _MIN_WIDTHS if len(heights) > 1 else _MIN_WIDTHS[:1]:
            blocks = _ladder_rects(strip, heights, min(max(1, -(-width // block_kv)), strip.shape[1]))
            rects = [(q0 + r0 * block_q, min(q0 + r1 * block_q, q_len), c0 * block_kv, min(c1 * block_kv, kv_len))
                     for r0, r1, c0, c1 in blocks]
            cost = sum(rect_cost(a1 - a0, b1 - b0) for a0, a1, b0, b1 in rects)
            if cost < best_cost:
                best, best_cost = rects, cost
    return best


def plan_rects(pattern: BlockPattern) -> list[list[list[Rect]]]:
    """Per group (``Bp * Hp``, row-major), per strip, the rectangles covering the pattern's full (non-partial)
    blocks exactly once. Memoised on the pattern (shared with its ``with_kv_lens`` copies)."""
    return pattern.memo(("rects",), lambda: _build_rects(pattern))


def _build_rects(pattern: BlockPattern) -> list[list[list[Rect]]]:
    bp, hp = pattern.groups
    bitmap = pattern.block_bitmap().cpu()
    if pattern.partial is not None:
        bitmap = bitmap & ~pattern.partial_bitmap().cpu()
    bitmap = bitmap.reshape(bp * hp, pattern.num_q_blocks, pattern.num_kv_blocks).numpy()
    rows_per_strip = max(1, _STRIP_QUERIES // pattern.block_q)
    plans = []
    for g in range(bp * hp):
        strips = []
        for r in range(0, pattern.num_q_blocks, rows_per_strip):
            strip = bitmap[g, r:r + rows_per_strip]
            if strip.any():
                strips.append(strip_rects(strip, q0=r * pattern.block_q, q_len=pattern.q_len,
                                          block_q=pattern.block_q, kv_len=pattern.kv_len, block_kv=pattern.block_kv))
        plans.append(strips)
    return plans
