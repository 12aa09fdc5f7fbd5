"""Reading the token grid back from rotary-embedding tables (for processors installed without a step context)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..layout import TokenLayout

__all__ = ["first_change", "rope_table_fits", "banded_rope_layout"]


def first_change(rows: torch.Tensor, default: int) -> int:
    """Index of the first row that differs from row 0 (``default`` if none)."""
    changed = torch.nonzero((rows != rows[0]).any(-1)).flatten()
    return int(changed[0]) if changed.numel() else default


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _runs(values: list[int]) -> list[int]:
    """``values`` with adjacent repeats collapsed."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def rope_table_fits(table: torch.Tensor, grid: tuple[int, int, int]) -> bool:
    """Whether the ``(S, C)`` rotary table is one of a raster ``grid``: every column depends on one axis only and
    the rows along each axis are pairwise distinct (positions that coincide make the grid unreadable)."""
    t, h, w = grid
    x = table.reshape(t, h, w, -1)
    only_t = (x == x[:, :1, :1]).flatten(0, 2).all(0)
    only_h = (x == x[:1, :, :1]).flatten(0, 2).all(0)
    only_w = (x == x[:1, :1, :]).flatten(0, 2).all(0)
    if not bool((only_t | only_h | only_w).all()):
        return False
    return all(torch.unique(rows, dim=0).shape[0] == rows.shape[0] for rows in (x[:, 0, 0], x[0, :, 0], x[0, 0, :]))


def banded_rope_layout(rotary_emb: Any, seq_len: int) -> Optional[TokenLayout]:
    """Read ``(T, H, W)`` back from a rotary table ``(cos, sin)``, each ``(S, D)``, whose head dim is split into
    contiguous t | h | w bands of unknown widths (HunyuanVideo's ``rope_axes_dim``, CogVideoX's D/4 | 3D/8 | 3D/8).

    For each column, the first row that differs from row 0 is ``H*W`` in the t band (never, if T = 1), ``W`` in
    the h band (never, if H = 1) and 1 in the w band (never, if W = 1). The factorisation ``T*H*W = S`` whose
    expected run of first-change rows equals the observed one is the grid; it is unique for any grid, degenerate
    axes included. ``None`` if no factorisation (or more than one) fits, or the table does not fit it (see
    :func:`rope_table_fits`).
    """
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return None
    cos, sin = rotary_emb
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != seq_len or seq_len < 1:
        return None
    changed = (cos != cos[:1]) | (sin != sin[:1])
    first = torch.where(changed.any(0), changed.int().argmax(0), torch.full_like(changed[0], seq_len, dtype=torch.long))
    observed = _runs(first.tolist())
    s = seq_len
    found = []
    for t in _divisors(s):
        for h in _divisors(s // t):
            w = s // t // h
            expected = _runs([h * w if t > 1 else s, w if h > 1 else s, 1 if w > 1 else s])
            if expected == observed:
                found.append((t, h, w))
    if len(found) != 1:
        return None
    if not rope_table_fits(torch.stack([cos, sin], -1).flatten(-2), found[0]):
        return None
    return TokenLayout(*found[0])
