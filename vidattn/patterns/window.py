"""FreeSwim's inward sliding window (spec ``freeswim.md`` §2.2) as an exact block pattern, built vectorized.

Per axis (coordinate ``q``, half size ``d``, axis length ``n``) a video query keeps the keys

    k_len = min(2d + 1, n),  start = clamp(q - d, 0, n - k_len),  start <= k <= start + k_len - 1     (inward)
    q - d <= k <= q + d                                                                                (truncated)

on the rows (``d_h = base_rows // 2``) and columns (``d_w = base_cols // 2``) of every frame, or of the frames of a
temporal half-window ``temporal`` (same rule along ``t``) when one is given. Text tokens attend and are attended
densely. The window is a box ``W(q) = Wt(q_t) x Wy(q_y) x Wx(q_x)``; each axis' bounds are non-decreasing in the
coordinate and step by at most one, so the windows of a run of consecutive columns ``xa..xb`` unite to the single
interval ``[lo_x(xa), hi_x(xb)]``.

Block classification (exact, for any token order): a (query block Q, key block K) entry is

* **full** iff every video key of K lies in every video query's window: the video keys' bounding box lies inside
  the intersection of the windows, itself a box (max of the starts, min of the ends per axis); also when Q or K
  holds no video token (text pairs are always kept);
* **listed** iff some pair is kept: Q or K holds text, or some video key of K lies in the window of some video query
  of Q. For the latter, Q's video tokens are cut into *rectangles* (cells of one block and frame, rows ``ya..yb``
  x columns ``xa..xb``: raster-contiguous runs of one row, merged over consecutive rows with the same columns),
  whose windows unite to one box ``Wt(t) x [lo_y(ya), hi_y(yb)] x [lo_x(xa), hi_x(xb)]``; each row ``(t', y')`` of
  that box is a raster interval ``[c0, c1]``. The key
  cells are cut into *pieces* (maximal raster-contiguous cells of one key block); pieces partition the raster line,
  so the pieces a raster interval meets are the contiguous range ``[piece(c0), piece(c1)]``. A difference array
  over pieces per query block marks them; a piece marked is a key block listed;
* **partial** iff listed and not full: the token predicate decides inside (it is never rounded to blocks).

Cost: ``rectangles x frames-in-window x rows-in-box`` intervals plus ``query blocks x pieces`` marks (no loop over block
pairs). The predicate is :class:`~vidattn.kernels.WindowPredicate` without a temporal window (the Triton kernel
evaluates it in-kernel), :class:`~vidattn.kernels.predicates.TemporalWindowPredicate` with one (torch / flex /
reference backends only), each wrapped in :class:`~vidattn.kernels.predicates.PermutedPredicate` outside raster order.
Padded-text keys are not part of the pattern: callers add ``kv_lens`` with :meth:`BlockPattern.with_kv_lens`.
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Optional

import torch

from ..kernels import BlockPattern
from ..kernels.predicates import PermutedPredicate, TemporalWindowPredicate, WindowPredicate, window_starts
from ..layout import TokenLayout
from ..token_order import order_permutation, sequence_permutation

__all__ = ["window_bounds", "window_pattern", "window_token_density"]

logger = logging.getLogger("vidattn")

# Work per chunk: query blocks x key pieces in the difference array, and enumerated (run, frame, row) intervals.
_CELLS_PER_CHUNK = 1 << 24
_INTERVALS_PER_CHUNK = 1 << 22


def window_bounds(length: int, half: int, inward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(lo, hi)``, each ``(length,)``: the inclusive window ``[lo[q], hi[q]]`` of each coordinate, inside
    ``[0, length)`` (spec §2.2: inward slides back inside, truncated is cut at the border)."""
    start, k_len = window_starts(length, half, inward)
    start = start.to(torch.int64)
    return start.clamp(min=0), (start + k_len - 1).clamp(max=length - 1)


def window_token_density(layout: TokenLayout, *, base_rows: int, base_cols: int, inward: bool = True,
                         temporal: Optional[int] = None) -> float:
    """Fraction of video keys each video query keeps, averaged over video queries (exact).

    The window is a product over axes and the queries range over the whole grid, so the mean is the product of each
    axis' mean window length over its length: ``kh*kw / (h*w)`` for an inward window without a temporal window.
    """
    base_rows, base_cols, temporal = _check_knobs(base_rows, base_cols, temporal)
    axes = [(layout.height, base_rows // 2), (layout.width, base_cols // 2)]
    if temporal is not None:
        axes.append((layout.frames, temporal))
    density = 1.0
    for n, half in axes:
        lo, hi = window_bounds(n, half, inward)
        density *= float((hi - lo + 1).sum()) / (n * n)
    return density


def _check_knobs(base_rows: object, base_cols: object, temporal: object) -> tuple[int, int, Optional[int]]:
    for name, value in (("base_rows", base_rows), ("base_cols", base_cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (latent cells of the base grid), got {value!r}")
    if temporal is not None and (isinstance(temporal, bool) or not isinstance(temporal, int) or temporal < 0):
        raise ValueError(f"temporal must be None or a non-negative integer (half-window in latent frames), "
                         f"got {temporal!r}")
    return base_rows, base_cols, temporal


def _classify(layout: TokenLayout, half_h: int, half_w: int, half_t: Optional[int], inward: bool,
              block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(nq, nk)`` listed and full bitmaps of the window over ``layout``'s sequence (module docstring)."""
    f, h, w = layout.frames, layout.height, layout.width
    hw, n = h * w, layout.video_tokens
    seq, v0 = layout.seq_len, layout.video_start
    nb = -(-seq // block)
    found = order_permutation(layout.order, f, h, w)
    inverse = torch.arange(n) if found is None else found[1]
    # Per raster cell r: its sequence position, block, coordinates and window bounds.
    pos = inverse.to(torch.int64) + v0
    blk = pos // block
    r = torch.arange(n)
    t, y, x = r // hw, (r % hw) // w, r % w
    tlo, thi = (torch.zeros(f, dtype=torch.int64), torch.full((f,), f - 1)) if half_t is None \
        else window_bounds(f, half_t, inward)
    ylo, yhi = window_bounds(h, half_h, inward)
    xlo, xhi = window_bounds(w, half_w, inward)

    # ---- full: every key's bounding box inside the intersection of the query windows (per block, scatter-reduced).
    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        out = torch.full((nb,), init, dtype=torch.int64)
        return out.scatter_reduce_(0, blk, values, how, include_self=True)

    big = max(f, h, w) + 1
    small = torch.int16 if big < 1 << 14 else torch.int64  # the per-pair box test runs on narrow integers
    q_box = [reduce(tlo[t], "amax", -big), reduce(thi[t], "amin", big), reduce(ylo[y], "amax", -big),
             reduce(yhi[y], "amin", big), reduce(xlo[x], "amax", -big), reduce(xhi[x], "amin", big)]
    k_box = [reduce(t, "amin", big), reduce(t, "amax", -big), reduce(y, "amin", big), reduce(y, "amax", -big),
             reduce(x, "amin", big), reduce(x, "amax", -big)]
    q_box, k_box = [v.to(small) for v in q_box], [v.to(small) for v in k_box]
    has_video = torch.zeros(nb, dtype=torch.bool)
    has_video[blk] = True
    sizes = torch.clamp(torch.arange(1, nb + 1) * block, max=seq) - torch.arange(nb) * block
    counts = torch.bincount(blk, minlength=nb)
    has_text = counts < sizes  # a block holds text iff not all its tokens are video tokens

    # ---- key pieces: raster-contiguous cells of one key block.
    piece_start = torch.ones(n, dtype=torch.bool)
    piece_start[1:] = blk[1:] != blk[:-1]
    piece_id = torch.cumsum(piece_start, 0) - 1
    piece_block = blk[piece_start]
    n_pieces = piece_block.numel()
    # ---- query rectangles: pieces cut at row starts give runs (one row, one block, consecutive columns); runs of
    # one block and frame over the same columns on consecutive rows merge into a rectangle [ya, yb] x [xa, xb],
    # whose windows unite to the box Wt(t) x [ylo[ya], yhi[yb]] x [xlo[xa], xhi[xb]].
    run_start = piece_start | (x == 0)
    starts = torch.nonzero(run_start).flatten()
    stops = torch.cat([starts[1:], torch.tensor([n])]) - 1
    rb, rt, ry, rxa, rxb = blk[starts], t[starts], y[starts], x[starts], x[stops]
    key = (((rb * f + rt) * w + rxa) * w + rxb) * h + ry
    order = torch.argsort(key)
    rb, rt, ry, rxa, rxb, key = (v[order] for v in (rb, rt, ry, rxa, rxb, key))
    new_rect = torch.ones_like(rb, dtype=torch.bool)
    new_rect[1:] = (key[1:] // h != key[:-1] // h) | (ry[1:] != ry[:-1] + 1)
    first = torch.nonzero(new_rect).flatten()
    last = torch.cat([first[1:], torch.tensor([rb.numel()])]) - 1
    q_blk, q_t = rb[first], rt[first]
    q_y0, q_y1 = ylo[ry[first]], yhi[ry[last]]
    q_x0, q_x1 = xlo[rxa[first]], xhi[rxb[first]]
    q_t0 = tlo[q_t]
    n_rows = q_y1 - q_y0 + 1
    n_int = (thi[q_t] - q_t0 + 1) * n_rows  # intervals (frame, row) per rectangle
    cum = torch.cumsum(n_int, 0)
    first_cell = (q_t0 * h + q_y0) * w + q_x0  # raster cell of each box's first corner
    width = q_x1 - q_x0
    ones = torch.ones(_INTERVALS_PER_CHUNK + int(n_int.max()), dtype=torch.int32)
    minus = -ones
    listed = torch.zeros(nb, nb, dtype=torch.bool)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    q_blocks = torch.nonzero(has_video).flatten()
    chunk_q = max(1, _CELLS_PER_CHUNK // (n_pieces + 1))
    first_rect = torch.searchsorted(q_blk, q_blocks)
    last_rect = torch.searchsorted(q_blk, q_blocks, right=True)
    for c in range(0, q_blocks.numel(), chunk_q):
        qb = q_blocks[c:c + chunk_q]
        lo_rect, hi_rect = int(first_rect[c]), int(last_rect[c + qb.numel() - 1])
        diff = torch.zeros(qb.numel() * (n_pieces + 1), dtype=torch.int32)
        a = lo_rect
        while a < hi_rect:
            done = int(cum[a - 1]) if a else 0
            b = int(torch.searchsorted(cum, done + _INTERVALS_PER_CHUNK, right=True))
            b = min(max(b, a + 1), hi_rect)
            counts = n_int[a:b]
            rect = torch.repeat_interleave(torch.arange(b - a), counts)
            offset = torch.arange(int(counts.sum())) - (cum[a:b] - counts - done)[rect]
            rows = n_rows[a:b][rect]
            cell = (offset // rows) * hw + (offset % rows) * w + first_cell[a:b][rect]
            base = (torch.searchsorted(qb, q_blk[a:b]) * (n_pieces + 1))[rect]
            diff.index_add_(0, base + piece_id[cell], ones[:cell.numel()])
            diff.index_add_(0, base + piece_id[cell + width[a:b][rect]] + 1, minus[:cell.numel()])
            a = b
        hit = torch.cumsum(diff.view(qb.numel(), n_pieces + 1)[:, :n_pieces], 1, dtype=torch.int32) > 0
        per_block = torch.zeros(qb.numel(), nb, dtype=torch.uint8)  # a block has <= block_size pieces
        per_block.index_add_(1, piece_block, hit.view(torch.uint8))
        listed[qb] = per_block.view(torch.bool) if block < 256 else per_block > 0
    # ---- full entries, tested only where possible: query blocks whose windows meet in a non-empty box, key blocks
    # no larger than that box (the frame axis is skipped without a temporal window: every frame is in it).
    axes = range(3) if half_t is not None else range(1, 3)
    q_ok, k_ok = has_video.clone(), has_video.clone()
    for a in axes:
        q_ok &= q_box[2 * a] <= q_box[2 * a + 1]
    if bool(q_ok.any()):
        for a in axes:
            k_ok &= (k_box[2 * a + 1] - k_box[2 * a]) <= (q_box[2 * a + 1] - q_box[2 * a])[q_ok].max()
    rows, cols = torch.nonzero(q_ok).flatten(), torch.nonzero(k_ok).flatten()
    kb = [v[cols][None] for v in k_box]
    step = max(1, _CELLS_PER_CHUNK // max(1, cols.numel()))
    for c in range(0, rows.numel() if cols.numel() else 0, step):
        qr = rows[c:c + step]
        inside = torch.ones(qr.numel(), cols.numel(), dtype=torch.bool)
        for a in axes:
            inside &= (kb[2 * a] >= q_box[2 * a][qr][:, None]) & (kb[2 * a + 1] <= q_box[2 * a + 1][qr][:, None])
        full[qr[:, None], cols[None]] = inside
    # Blocks without video on either side are full (text pairs are kept); text rows and columns are listed.
    full[~has_video, :] = True
    full[:, ~has_video] = True
    listed |= full
    listed[has_text, :] = True
    listed[:, has_text] = True
    return listed, full


def _predicate(layout: TokenLayout, half_h: int, half_w: int, half_t: Optional[int], inward: bool):
    f, h, w, v0 = layout.frames, layout.height, layout.width, layout.video_start
    if half_t is None:
        pred = WindowPredicate.inward(f, h, w, half_h, half_w, video_start=v0, inward=inward)
    else:
        pred = TemporalWindowPredicate.inward(f, h, w, half_t, half_h, half_w, video_start=v0, inward=inward)
    found = sequence_permutation(layout, layout.order)
    return pred if found is None else PermutedPredicate(pred, found[0])


@lru_cache(maxsize=16)
def _build(layout: TokenLayout, half_h: int, half_w: int, half_t: Optional[int], inward: bool,
           block: int) -> BlockPattern:
    began = time.perf_counter()
    listed, full = _classify(layout, half_h, half_w, half_t, inward, block)
    partial = listed & ~full
    nb = listed.shape[0]
    indptr = torch.zeros(nb + 1, dtype=torch.int64)
    torch.cumsum(listed.view(torch.uint8).sum(1, dtype=torch.int64), 0, out=indptr[1:])
    indices = torch.nonzero(listed)[:, 1]
    part = partial[listed]
    has_partial = bool(part.any())
    pattern = BlockPattern(q_len=layout.seq_len, kv_len=layout.seq_len, block_q=block, block_kv=block,
                           indptr=indptr[None, None], indices=indices[None, None],
                           partial=part[None, None] if has_partial else None,
                           predicate=_predicate(layout, half_h, half_w, half_t, inward) if has_partial else None)
    elapsed = time.perf_counter() - began
    logger.info("window mask %dx%dx%d (+%d text, %s order) half %s x %d x %d%s block=%d built in %.3f s: "
                "%d listed blocks of %dx%d (%d partial), block density %.4f", layout.frames, layout.height,
                layout.width, layout.text_tokens, layout.order, "all" if half_t is None else half_t, half_h, half_w,
                "" if inward else " truncated", block, elapsed, indices.numel(), nb, nb, int(part.sum()),
                pattern.density())
    return pattern


def window_pattern(layout: TokenLayout, *, base_rows: int, base_cols: int, inward: bool = True,
                   temporal: Optional[int] = None, block_size: int = 128) -> BlockPattern:
    """FreeSwim's window (spec §2.2) over ``layout``'s whole sequence ``S = video + text``, in ``layout.order``.

    Half sizes ``base_rows // 2`` and ``base_cols // 2`` (latent cells of the base grid: 480x832 on Wan is 30x52,
    window 31x53), shifted inward at the borders (``inward=False``: the truncated ablation). Every frame is seen
    unless ``temporal`` (a half-window in latent frames, same inward/truncated rule along ``t``) is given. Text rows
    and columns are dense. Exact: blocks wholly inside the window are full entries, blocks wholly outside are not
    listed, the others are partial and carry the token predicate (module docstring). Padded-text keys are not
    masked here (add them with ``with_kv_lens``). Any token order works (raster, ``tiles<R>x<C>``, ``gilbert``);
    with a temporal window the predicate is not Triton's (torch / flex / reference backends). Cached per (layout
    without text validity, knobs).
    """
    if not isinstance(layout, TokenLayout):
        raise ValueError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    base_rows, base_cols, temporal = _check_knobs(base_rows, base_cols, temporal)
    if not isinstance(inward, bool):
        raise ValueError(f"inward must be True or False, got {inward!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (e.g. 64 or 128), got {block_size!r}")
    return _build(layout.without_valid(), base_rows // 2, base_cols // 2, temporal, inward, block_size)
