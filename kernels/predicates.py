"""Token-level predicates for partially covered blocks.

A predicate refines the blocks a :class:`~vidattn.kernels.BlockPattern` marks *partial*: inside such a block a
(query, key) pair is kept only where ``predicate(q_idx, kv_idx)`` is true. Predicates are written with plain torch
ops on broadcastable index tensors, so the same object serves the torch backend, FlexAttention's ``mask_mod`` and
the dense reference; the Triton kernel reads the same fields (bound tables) and evaluates the rule in-kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["WindowPredicate", "window_starts"]


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
