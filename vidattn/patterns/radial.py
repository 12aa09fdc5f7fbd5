"""Radial Attention's static block mask (spec ``radial.md`` §2.2), built vectorized at block level.

Frames ``i, j`` at distance ``d = |i - j|`` keep the token band ``|k - l| <= w(d)`` (raster indices inside a frame):

    P = 2**bl(s)                                   bl = bit length, so P is the power of two strictly above s
    w(0) = s,  w(1) = s (d1_full) or s // 2,  w(d >= 2) = floor(max(P / 2**bl(d) * decay, B))
    pair kept iff d <= 1, or w0 = P / 2**bl(d) >= THR, or d % int(THR / w0) == 0
    key frames j < sink_frames: the whole s x s pair is kept

Each pair's token mask is shrunk to blocks by the density vote ``#(cols with > 1/3 of the rows kept) / #(cols with
any row kept) > 0.6`` and OR-ed into the ``ceil(S/B)`` grid; text rows and columns (and the blocks they share with
video) are dense.

Upstream (``literal=True``) votes on ``ceil(s/B)`` tiles counted from the frame's first block and divides by ``B``
rows, as if every frame started on a block edge. When a frame starts inside a block (text first, as CogVideoX, or
``s`` not a multiple of ``B``), the block its tokens spill into is never voted for, so some queries miss keys of
their own frame (spec §2.2a: 0 % of it for CogVideoX at 81x768x1360). The default rule votes on the tokens' real
positions: every block the pair's tokens touch, dividing by the frame's own rows in that block. A pair kept whole
(its own frame, ``d1_full`` neighbours, sink frames) therefore keeps every block it touches: each query attends all
keys of those frames at any alignment, and no query block row is ever empty. On block-aligned frames (Wan and
HunyuanVideo at their published sizes) both rules give the same mask.

The vote is computed analytically: for a band, the rows kept in a canvas column form an interval intersection, so
``count(l) = |[a, b) ∩ [l - w, l + w]|`` and ``{l : count(l) > t}`` is the interval ``[a + t - w, b - t + w - 1]``
(non-empty only if ``b - a > t`` and ``2w + 1 > t``). A block tile therefore costs O(1) per block, and tiles are
computed once per distinct (width, row offset, column offset).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..kernels import BlockPattern
from ..layout import TextSegment, TokenLayout

__all__ = [
    "MODEL_GEOMETRY",
    "GeometryError",
    "LatentGeometry",
    "RadialStats",
    "radial_pattern",
    "radial_stats",
]

logger = logging.getLogger("vidattn")


# ---------------------------------------------------------------------------------------------------- model geometry
class GeometryError(ValueError):
    """A video size the model cannot take; ``param`` names the argument (frames, height, width, text_len)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param} {reason}")
        self.param, self.reason = param, reason


@dataclass(frozen=True)
class LatentGeometry:
    """How a model turns ``frames x height x width`` pixels into its latent token grid.

    latent frames = ((F - 1) / temporal + 1) / patch_t,  rows = H / (spatial * patch_s),  cols = W / (spatial * patch_s)
    """

    temporal: int
    spatial: int
    patch_t: int
    patch_s: int
    text_len: int = 0
    text_position: Optional[str] = None
    sink_frames: int = 1

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(f, h, w)`` latent tokens; raises :class:`GeometryError` naming the parameter that does not fit."""
        t = self.temporal
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
            raise GeometryError("frames", f"must be k*{t}+1 video frames (1, {t + 1}, {2 * t + 1}, ...), got {frames}")
        latent = (frames - 1) // t + 1
        if latent % self.patch_t:
            raise GeometryError("frames", f"gives {latent} latent frames, not a multiple of patch_t={self.patch_t}")
        factor = self.spatial * self.patch_s
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise GeometryError(name, f"must be a positive multiple of {factor} pixels, got {value}")
        return latent // self.patch_t, height // factor, width // factor

    def layout(self, frames: int, height: int, width: int, text_len: Optional[int] = None) -> TokenLayout:
        """The self-attention :class:`TokenLayout` for a video of ``frames x height x width`` pixels."""
        f, h, w = self.latent_grid(frames, height, width)
        n_text = self.text_len if text_len is None else text_len
        if not isinstance(n_text, int) or n_text < 0:
            raise GeometryError("text_len", f"must be a non-negative integer, got {n_text!r}")
        if n_text and self.text_position is None:
            raise GeometryError("text_len", "must be 0: this model keeps text in cross-attention, not self-attention")
        text = TextSegment(n_text, self.text_position) if n_text else None
        return TokenLayout(f, h, w, text=text)


MODEL_GEOMETRY: dict[str, LatentGeometry] = {
    "wan": LatentGeometry(temporal=4, spatial=8, patch_t=1, patch_s=2, sink_frames=1),
    "hunyuan": LatentGeometry(temporal=4, spatial=8, patch_t=1, patch_s=2, text_len=256, text_position="last",
                              sink_frames=0),
    "cogvideox": LatentGeometry(temporal=4, spatial=8, patch_t=1, patch_s=2, text_len=226, text_position="first",
                                sink_frames=1),
    "ltx": LatentGeometry(temporal=8, spatial=32, patch_t=1, patch_s=1, sink_frames=1),
    "mochi": LatentGeometry(temporal=6, spatial=8, patch_t=1, patch_s=2, text_len=256, text_position="last",
                            sink_frames=1),
}


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class RadialStats:
    """Densities of a radial mask: fractions of token pairs *computed* (inside kept blocks), not sparsity.

    video_density        kept video-query x video-key pairs / n_video**2
    total_density        kept pairs over the whole S x S sequence, text included
    keys_per_query       mean keys computed per query over the whole sequence (total_density * S)
    video_keys_per_query mean video keys computed per video query (video_density * n_video)
    """

    video_density: float
    total_density: float
    keys_per_query: float
    video_keys_per_query: float
    num_blocks: int
    kept_blocks: int

    def __str__(self) -> str:
        return (f"density (fraction computed): video-video {self.video_density:.4f}, "
                f"whole sequence {self.total_density:.4f}; keys per query {self.keys_per_query:.1f} "
                f"(video keys per video query {self.video_keys_per_query:.1f}); "
                f"blocks {self.kept_blocks}/{self.num_blocks}x{self.num_blocks}")


def _tokens_per_block(nb: int, block: int, start: int, stop: int) -> torch.Tensor:
    """int64 ``(nb,)``: how many of the tokens ``[start, stop)`` fall in each block."""
    lo = torch.arange(nb, dtype=torch.int64) * block
    return (torch.clamp(lo + block, max=stop) - torch.clamp(lo, min=start)).clamp(min=0)


def _row_counts(bitmap: torch.Tensor) -> torch.Tensor:
    """int64 ``(nq,)``: kept blocks per row (summed as bytes: far faster than a bool reduction)."""
    return bitmap.contiguous().view(torch.uint8).sum(1, dtype=torch.int32).to(torch.int64)


def _kept_pairs(bitmap: torch.Tensor, row_counts: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                block: int) -> int:
    """Exact ``rows @ bitmap @ cols`` in integers; ``cols`` equals ``block`` except in a few boundary blocks."""
    special = torch.nonzero(cols != block).flatten()
    per_row = block * row_counts
    if special.numel():
        per_row -= bitmap[:, special].to(torch.int64) @ (block - cols[special])
    return int(rows @ per_row)


def _stats_from_bitmap(layout: TokenLayout, bitmap: torch.Tensor, block: int) -> RadialStats:
    nb = bitmap.shape[-1]
    seq, n = layout.seq_len, layout.video_tokens
    everything = _tokens_per_block(nb, block, 0, seq)
    video = _tokens_per_block(nb, block, layout.video_start, layout.video_start + n)
    counts = _row_counts(bitmap)
    total = _kept_pairs(bitmap, counts, everything, everything, block) / seq ** 2
    vid = _kept_pairs(bitmap, counts, video, video, block) / n ** 2
    return RadialStats(video_density=vid, total_density=total, keys_per_query=total * seq,
                       video_keys_per_query=vid * n, num_blocks=nb, kept_blocks=int(counts.sum()))


def radial_stats(layout: TokenLayout, pattern: BlockPattern) -> RadialStats:
    """Density report (spec §2.4) of ``pattern``, a single-group block pattern over ``layout``'s sequence."""
    if pattern.q_len != layout.seq_len or pattern.kv_len != layout.seq_len or pattern.block_q != pattern.block_kv:
        raise ValueError(f"pattern ({pattern.q_len}x{pattern.kv_len}, blocks {pattern.block_q}x{pattern.block_kv}) "
                         f"does not cover the layout's {layout.seq_len} tokens with square blocks")
    if pattern.groups != (1, 1):
        raise ValueError(f"radial_stats needs a head- and batch-shared pattern, got groups {pattern.groups}")
    return _stats_from_bitmap(layout, pattern.block_bitmap()[0, 0], pattern.block_q)


# ---------------------------------------------------------------------------------------------------- the mask
def _frame_widths(frames: int, s: int, block: int, decay: float, d1_full: bool, threshold: float) -> torch.Tensor:
    """int64 ``(frames,)``: band half-width ``w(d)`` per frame distance, clamped to ``s``; ``-1`` = pair dropped."""
    p = 1 << s.bit_length()
    out = []
    for d in range(frames):
        if d == 0:
            w = s
        elif d == 1:
            w = s if d1_full else s // 2
        else:
            w0 = p / 2 ** d.bit_length()
            if w0 < threshold and d % int(threshold / w0):
                w = -1
            else:
                w = math.floor(max(w0 * decay, block))
        out.append(min(w, s))
    return torch.tensor(out, dtype=torch.int64)


def _vote_tiles(width: torch.Tensor, ro: torch.Tensor, co: torch.Tensor, s: int, block: int, c: int,
                literal: bool) -> torch.Tensor:
    """bool ``(K, c, c)``: the shrink vote of the band ``|k - l| <= width`` placed at offsets ``(ro, co)``.

    Tile ``(bi, bj)`` sees frame rows ``[a, b)`` and frame columns ``[ca, cb)``; a column ``l`` has
    ``count(l) = |[a, b) ∩ [l - w, l + w]|`` kept rows, and ``count(l) > t`` exactly on ``[a + t - w, b - t + w - 1]``.
    ``col_den > 1/3`` is ``count > e // 3`` with ``e`` the rows the vote divides by: ``B`` (``literal``, upstream's
    canvas) or the frame's own rows in the block, ``b - a``; the block is kept iff ``n0 > 0`` and ``n1 / n0 > 0.6``,
    i.e. ``5 n1 > 3 n0``. With ``e = b - a`` a full pair (``w >= s``) keeps every block it touches.
    """
    w = width.to(torch.int32)[:, None, None]
    edges = torch.arange(c, dtype=torch.int32) * block
    ro, co = ro.to(torch.int32), co.to(torch.int32)
    a = (edges[None, :, None] - ro[:, None, None]).clamp(min=0)
    b = (edges[None, :, None] + block - ro[:, None, None]).clamp(max=s)
    ca = (edges[None, None, :] - co[:, None, None]).clamp(min=0)
    cb = (edges[None, None, :] + block - co[:, None, None]).clamp(max=s)
    rows = b - a

    def columns_over(t: torch.Tensor | int) -> torch.Tensor:
        n = (torch.minimum(b + (w - t), cb) - torch.maximum(a - (w - t), ca)).clamp(min=0)
        return n * ((rows > t) & (2 * w + 1 > t))

    n0, n1 = columns_over(0), columns_over(block // 3 if literal else rows.clamp(min=0) // 3)
    return (n0 > 0) & (5 * n1 > 3 * n0)


def _or_into(x: torch.Tensor, dest: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """OR the slices of ``x`` along ``dim`` into ``size`` slots (slice ``r`` goes to ``dest[r]``; ``dest >= size``
    is dropped).

    Sorted by destination, then one gather of each slot's first source and OR-ing the few later sources (frames
    sharing a boundary block).
    """
    dest, order = torch.sort(dest, stable=True)
    x = x.index_select(dim, order)
    slots = torch.arange(size)
    lo = torch.searchsorted(dest, slots)
    count = torch.searchsorted(dest, slots, right=True) - lo
    out = x.index_select(dim, lo.clamp(max=dest.numel() - 1))
    out.index_fill_(dim, torch.nonzero(count == 0).flatten(), False)
    for k in range(1, int(count.max())):
        more = torch.nonzero(count > k).flatten()
        merged = out.index_select(dim, more) | x.index_select(dim, lo[more] + k)
        out.index_copy_(dim, more, merged)
    return out


def _radial_bitmap(layout: TokenLayout, decay: float, block: int, sink: int, d1_full: bool, threshold: float,
                   literal: bool) -> torch.Tensor:
    """bool ``(nb, nb)`` block mask of spec §2.2 (``literal``) or §2.2a (default) over ``layout``'s sequence.

    Each frame pair votes on tiles counted from its frames' first blocks: ``ceil(s / B)`` of them (upstream, which
    misses the block a misaligned frame spills into) or every block the frame's tokens touch (ours).
    """
    f, s = layout.frames, layout.tokens_per_frame
    seq, v0 = layout.seq_len, layout.video_start
    nb = -(-seq // block)
    widths = _frame_widths(f, s, block, decay, d1_full, threshold)
    idx = torch.arange(f)
    pair_w = widths[(idx[:, None] - idx[None, :]).abs()]
    pair_w[:, :sink] = s
    start = v0 + idx * s
    first_block, offset = start // block, start % block
    c = -(-s // block) if literal else int(((start + s - 1) // block - first_block).max()) + 1
    # One tile per distinct (width, query-frame offset, key-frame offset); offsets take at most B values.
    key = ((pair_w + 1) * block + offset[:, None]) * block + offset[None, :]
    uniq, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    tiles = _vote_tiles(uniq // (block * block) - 1, (uniq // block) % block, uniq % block, s, block, c, literal)
    # Frame i's tile rows go to blocks first_block[i] + (0..c-1); consecutive frames may share their boundary
    # block, so scatter by OR-ing the few sources of each block row, then of each column.
    grid = tiles[inverse].reshape(f, f, c, c).permute(0, 2, 1, 3).reshape(f * c, f * c)
    dest = (first_block[:, None] + torch.arange(c)[None, :]).reshape(-1)
    mask = _or_into(_or_into(grid, dest, nb, 0), dest, nb, 1)
    if layout.text_tokens:
        t0 = layout.text_start
        tb = slice(t0 // block, -(-(t0 + layout.text_tokens) // block))
        mask[tb, :] = True
        mask[:, tb] = True
    return mask


def _pattern_from_bitmap(bitmap: torch.Tensor, seq: int, block: int) -> BlockPattern:
    """The single-group :class:`BlockPattern` listing ``bitmap``'s kept blocks (row-major, so columns ascend)."""
    nb = bitmap.shape[0]
    indptr = torch.zeros(nb + 1, dtype=torch.int64)
    torch.cumsum(_row_counts(bitmap), 0, out=indptr[1:])
    indices = torch.nonzero(bitmap)[:, 1]
    return BlockPattern(q_len=seq, kv_len=seq, block_q=block, block_kv=block, indptr=indptr[None, None],
                        indices=indices[None, None])


@lru_cache(maxsize=16)
def _build(layout: TokenLayout, decay: float, block: int, sink: int, d1_full: bool, threshold: float,
           literal: bool) -> BlockPattern:
    """Build (and log the densities of) the pattern for validated knobs; memoised per (layout, knobs)."""
    began = time.perf_counter()
    bitmap = _radial_bitmap(layout, decay, block, sink, d1_full, threshold, literal)
    pattern = _pattern_from_bitmap(bitmap, layout.seq_len, block)
    elapsed = time.perf_counter() - began
    logger.info("radial mask %dx%dx%d (+%d text) decay=%g block=%d sink=%d d1_full=%s threshold=%g%s built in %.3f s: "
                "%s", layout.frames, layout.height, layout.width, layout.text_tokens, decay, block, sink, d1_full,
                threshold, " literal" if literal else "", elapsed, _stats_from_bitmap(layout, bitmap, block))
    return pattern


def _check_real(name: str, value: object, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number in {accepted}, got {value!r}")
    return float(value)


def radial_pattern(layout: TokenLayout, *, decay: float = 1.0, block_size: int = 128,
                   sink_frames: Optional[int] = None, d1_full: bool = True,
                   decimation_threshold: float = 128, literal: bool = False) -> BlockPattern:
    """Radial Attention's block pattern (spec §2.2) over ``layout``'s whole sequence ``S = video + text``.

    ``ceil(S / block_size)`` blocks per side (the ragged tail is kept); text rows/columns are dense. ``decay`` in
    ``(0, inf)`` scales the bands of frame distances >= 2; ``sink_frames`` in ``[0, frames]`` key frames are dense
    for every query (``None``: 0, the caller passes the model default); ``d1_full`` keeps adjacent frames fully
    (else half width); ``decimation_threshold`` (> 0, tokens) is the un-decayed width below which only every
    ``int(THR / w0)``-th frame distance is kept. Cached per (layout without text validity, knobs).

    By default the votes are taken on the tokens' real positions (spec §2.2a), so every query attends all keys of its
    own frame, of the sink frames and (``d1_full``) of the adjacent frames at any alignment; ``literal=True`` gives
    upstream's exact mask (spec §2.2), for parity tests. Both agree when every frame starts on a block edge.
    """
    if not isinstance(layout, TokenLayout):
        raise ValueError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if layout.order != "raster":
        raise ValueError(f"layout.order must be 'raster' for the radial pattern, got {layout.order!r}")
    decay = _check_real("decay", decay, "(0, inf)")
    threshold = _check_real("decimation_threshold", decimation_threshold, "(0, inf)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (e.g. 64 or 128), got {block_size!r}")
    sink = 0 if sink_frames is None else sink_frames
    if isinstance(sink, bool) or not isinstance(sink, int) or not 0 <= sink <= layout.frames:
        raise ValueError(f"sink_frames must be an integer in [0, frames={layout.frames}], got {sink_frames!r}")
    if not isinstance(d1_full, bool):
        raise ValueError(f"d1_full must be True or False, got {d1_full!r}")
    if not isinstance(literal, bool):
        raise ValueError(f"literal must be True or False, got {literal!r}")
    return _build(layout.without_valid(), decay, block_size, sink, d1_full, threshold, literal)
