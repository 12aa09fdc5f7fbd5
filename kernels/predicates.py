"""Token-level predicates for partially covered blocks.

A predicate refines the blocks a :class:`~vidattn.kernels.BlockPattern` marks *partial*: inside such a block a
(query, key) pair is kept only where ``predicate(q_idx, kv_idx)`` is true. Predicates are written with plain torch
ops on broadcastable index tensors, so the same object serves the torch backend, FlexAttention's ``mask_mod`` and
the dense reference; the Triton kernel reads the same fields (bound tables) and evaluates the rule in-kernel.

:class:`TemporalWindowPredicate` (a frame window on top of :class:`WindowPredicate`) and :class:`PermutedPredicate`
(any raster predicate read through a token order) run on the torch, flex and reference backends. The Triton kernel
evaluates only what ``triton_attention.kernel_window`` maps to its in-kernel window (a :class:`WindowPredicate`,
possibly permuted among the video tokens) and refuses the others (``auto`` then picks flex on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ALWAYS", "PermutedPredicate", "ShiftedPredicate", "TemporalWindowPredicate", "WindowPredicate",
           "window_starts", "window_tables"]

#: Key time coordinate of a token that every query keeps (text), in :func:`window_tables`.
ALWAYS = -(2 ** 31)
_OPEN = 2 ** 30  # half-width of the bounds that hold every coordinate


def window_starts(length: int, half: int, inward: bool = True) -> tuple[torch.Tensor, int]:
    """Start of each coordinate's window along one axis, and the window length.

    ``k_len = min(2*half + 1, length)``. Inward windows keep their full size at the borders and slide back inside:
    ``start[q] = clamp(q - half, 0, length - k_len)``. Truncated windows (``inward=False``) are cut at the border,
    which the predicate expresses with a per-coordinate start and the per-coordinate end ``q + half``; for that
    case the returned length is ``2*half + 1`` and callers clamp the end to the axis (keys past it do not exist).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if half < 0:
        raise ValueError(f"half must be >= 0, got {half}")
    k_len = min(2 * half + 1, length)
    q = torch.arange(length, dtype=torch.int32)
    if inward:
        start = (q - half).clamp(0, length - k_len)
        return start.to(torch.int32), k_len
    return (q - half).to(torch.int32), 2 * half + 1


@dataclass(frozen=True, eq=False)
class WindowPredicate:
    """A spatial rectangle window on a frame-major ``(frames, height, width)`` video grid.

    The video occupies tokens ``[video_start, video_start + frames*height*width)`` of both the query and the key
    sequence (raster order ``t, y, x``). A video query at ``(qy, qx)`` keeps video keys with
    ``row_start[qy] <= ky < row_start[qy] + row_len`` and ``col_start[qx] <= kx < col_start[qx] + col_len`` in every
    frame (no temporal window). Pairs that involve a non-video token (text) are always kept, so text rows and
    columns stay dense.
    """

    video_start: int
    frames: int
    height: int
    width: int
    row_start: torch.Tensor
    row_len: int
    col_start: torch.Tensor
    col_len: int
    _per_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.row_start.shape != (self.height,) or self.col_start.shape != (self.width,):
            raise ValueError(
                f"row_start must have shape ({self.height},) and col_start ({self.width},); "
                f"got {tuple(self.row_start.shape)} and {tuple(self.col_start.shape)}"
            )

    @classmethod
    def inward(
        cls, frames: int, height: int, width: int, half_h: int, half_w: int, *, video_start: int = 0,
        inward: bool = True,
    ) -> "WindowPredicate":
        """The FreeSwim window of half sizes ``(half_h, half_w)``; ``inward=False`` gives the truncated ablation."""
        rs, rl = window_starts(height, half_h, inward)
        cs, cl = window_starts(width, half_w, inward)
        return cls(video_start, frames, height, width, rs, rl, cs, cl)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    def to(self, device: torch.device | str) -> "WindowPredicate":
        device = torch.device(device)
        if self.row_start.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = WindowPredicate(
                self.video_start, self.frames, self.height, self.width, self.row_start.to(device), self.row_len,
                self.col_start.to(device), self.col_len,
            )
        return self._per_device[device]

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        n = self.video_tokens
        hw = self.height * self.width
        qv = q_idx - self.video_start
        kv = kv_idx - self.video_start
        q_video = (qv >= 0) & (qv < n)
        k_video = (kv >= 0) & (kv < n)
        qs = qv.clamp(0, n - 1) % hw
        ks = kv.clamp(0, n - 1) % hw
        qy, qx = qs // self.width, qs % self.width
        ky, kx = ks // self.width, ks % self.width
        y0 = self.row_start[qy]
        x0 = self.col_start[qx]
        inside = (ky >= y0) & (ky < y0 + self.row_len) & (kx >= x0) & (kx < x0 + self.col_len)
        return inside | ~(q_video & k_video)


@dataclass(frozen=True, eq=False)
class TemporalWindowPredicate:
    """:class:`WindowPredicate` ``spatial`` restricted to a window of frames.

    A video query in frame ``qt`` keeps video keys of frames ``frame_start[qt] <= kt < frame_start[qt] + frame_len``
    that the spatial window keeps (``frame_start``/``frame_len`` from :func:`window_starts` on the frame axis: inward
    or truncated like the spatial axes). Pairs that involve a non-video token are always kept. Not evaluated by the
    Triton kernel (torch, flex and reference backends only).
    """

    spatial: WindowPredicate
    frame_start: torch.Tensor
    frame_len: int
    _per_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.frame_start.shape != (self.spatial.frames,):
            raise ValueError(f"frame_start must have shape ({self.spatial.frames},), "
                             f"got {tuple(self.frame_start.shape)}")

    @classmethod
    def inward(
        cls, frames: int, height: int, width: int, half_t: int, half_h: int, half_w: int, *, video_start: int = 0,
        inward: bool = True,
    ) -> "TemporalWindowPredicate":
        """Half sizes ``(half_t, half_h, half_w)`` in frames, rows, columns; ``inward=False``: truncated on every axis."""
        spatial = WindowPredicate.inward(frames, height, width, half_h, half_w, video_start=video_start, inward=inward)
        ts, tl = window_starts(frames, half_t, inward)
        return cls(spatial, ts, tl)

    def to(self, device: torch.device | str) -> "TemporalWindowPredicate":
        device = torch.device(device)
        if self.frame_start.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = TemporalWindowPredicate(self.spatial.to(device), self.frame_start.to(device),
                                                               self.frame_len)
        return self._per_device[device]

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        sp = self.spatial
        n = sp.video_tokens
        hw = sp.height * sp.width
        qv = q_idx - sp.video_start
        kv = kv_idx - sp.video_start
        both = (qv >= 0) & (qv < n) & (kv >= 0) & (kv < n)
        qt = qv.clamp(0, n - 1) // hw
        kt = kv.clamp(0, n - 1) // hw
        t0 = self.frame_start[qt]
        inside = (kt >= t0) & (kt < t0 + self.frame_len)
        return sp(q_idx, kv_idx) & (inside | ~both)


@dataclass(frozen=True, eq=False)
class PermutedPredicate:
    """A raster-order predicate read through a token order: ``base(perm[q], perm[kv])``.

    ``perm`` (int64, the whole attention sequence) maps a position of the permuted sequence to its raster sequence
    index (:func:`vidattn.token_order.sequence_permutation`'s ``perm``; text positions map to themselves). Indices
    are clamped into ``[0, len(perm))`` before the lookup, so the padded tails some kernels evaluate stay in bounds
    (their pairs are masked elsewhere). Runs on the torch, flex and reference backends; Triton takes it only where
    ``base`` is a :class:`WindowPredicate` and ``perm`` moves video tokens among themselves (``kernel_window``).
    """

    base: Any
    perm: torch.Tensor
    _per_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.perm.dim() != 1 or self.perm.numel() < 1:
            raise ValueError(f"perm must be a non-empty 1-D tensor, got shape {tuple(self.perm.shape)}")

    def to(self, device: torch.device | str) -> "PermutedPredicate":
        device = torch.device(device)
        if self.perm.device == device:
            return self
        if device not in self._per_device:
            base = self.base.to(device) if hasattr(self.base, "to") else self.base
            self._per_device[device] = PermutedPredicate(base, self.perm.to(device))
        return self._per_device[device]

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        last = self.perm.numel() - 1
        return self.base(self.perm[q_idx.clamp(0, last)], self.perm[kv_idx.clamp(0, last)])


@dataclass(frozen=True, eq=False)
class ShiftedPredicate:
    """``base`` read at global positions: a shard's local ``(q, kv)`` is ``(q + q_offset, kv + kv_offset)`` (the
    (query shard, key shard) pairs of ring attention, ``vidattn.parallel``)."""

    base: Any
    q_offset: int
    kv_offset: int

    def to(self, device: torch.device | str) -> "ShiftedPredicate":
        base = self.base.to(device) if hasattr(self.base, "to") else self.base
        return self if base is self.base else ShiftedPredicate(base, self.q_offset, self.kv_offset)

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return self.base(q_idx + self.q_offset, kv_idx + self.kv_offset)


def window_tables(predicate: Any, q_len: int, kv_len: int) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """The window predicate as per-token tables, or None for a predicate that is not a window.

    ``q_bounds`` int32 ``(q_len, 6)``: ``t0, t1, y0, y1, x0, x1`` of each query's window (a text query: bounds that
    hold every coordinate); ``k_coords`` int32 ``(kv_len, 3)``: ``t, y, x`` of each key (a text key: ``t = ALWAYS``).
    The pair ``(q, k)`` is kept iff ``k_coords[k, 0] == ALWAYS`` or every coordinate lies in its half-open bounds —
    exactly ``predicate(q, k)`` for :class:`WindowPredicate`, :class:`TemporalWindowPredicate`, a
    :class:`PermutedPredicate` over either (the tables are read through ``perm``) and a :class:`ShiftedPredicate`
    over any of these (the rows of its offsets). The CPU extension builds partial
    blocks' masks from them.
    """
    if isinstance(predicate, ShiftedPredicate):  # a shard of a window: the global tables, sliced
        found = window_tables(predicate.base, q_len + predicate.q_offset, kv_len + predicate.kv_offset)
        return None if found is None else (found[0][predicate.q_offset:].contiguous(),
                                           found[1][predicate.kv_offset:].contiguous())
    perm = None
    if isinstance(predicate, PermutedPredicate):
        perm, predicate = predicate.perm.cpu(), predicate.base
    if isinstance(predicate, TemporalWindowPredicate):
        spatial, t_start, t_len = predicate.spatial, predicate.frame_start.cpu().long(), predicate.frame_len
    elif isinstance(predicate, WindowPredicate):
        spatial, t_start, t_len = predicate, None, None
    else:
        return None
    return _tables_at(spatial, t_start, t_len, perm, q_len), _coords_at(spatial, perm, kv_len)


def _raster(idx: torch.Tensor, perm: "torch.Tensor | None") -> torch.Tensor:
    return idx if perm is None else perm[idx.clamp(0, perm.numel() - 1)]


def _grid(sp: WindowPredicate, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(is_video, t, y, x)`` of raster sequence indices."""
    v = idx - sp.video_start
    video = (v >= 0) & (v < sp.video_tokens)
    v = v.clamp(0, sp.video_tokens - 1)
    hw = sp.height * sp.width
    return video, v // hw, (v % hw) // sp.width, v % sp.width


def _tables_at(sp: WindowPredicate, t_start, t_len, perm, q_len: int) -> torch.Tensor:
    video, t, y, x = _grid(sp, _raster(torch.arange(q_len, dtype=torch.int64), perm))
    y0, x0 = sp.row_start.cpu().long()[y], sp.col_start.cpu().long()[x]
    if t_start is None:
        t0, t1 = torch.full_like(t, -_OPEN), torch.full_like(t, _OPEN)
    else:
        t0 = t_start[t]
        t1 = t0 + t_len
    bounds = torch.stack([t0, t1, y0, y0 + sp.row_len, x0, x0 + sp.col_len], 1)
    open_row = torch.tensor([-_OPEN, _OPEN] * 3, dtype=torch.int64)
    return torch.where(video[:, None], bounds, open_row).to(torch.int32).contiguous()


def _coords_at(sp: WindowPredicate, perm, kv_len: int) -> torch.Tensor:
    video, t, y, x = _grid(sp, _raster(torch.arange(kv_len, dtype=torch.int64), perm))
    t = torch.where(video, t, torch.full_like(t, ALWAYS))
    return torch.stack([t, y, x], 1).to(torch.int32).contiguous()
