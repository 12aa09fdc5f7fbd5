"""Generalized Hilbert ("Gilbert") token order for video grids, and the block-neighbour matrix built on it.

The 3-D generalized Hilbert curve (J. Červený's ``gilbert3d``; ``gilbert_xyz2d`` by abetusk) visits every cell of
a ``frames x rows x cols`` box of any size exactly once by recursively cutting the box into 2, 3 or 5 sub-boxes,
so tokens close on the curve are close in space. We use upstream's fixed axis order (not "largest axis first"):
the curve starts at cell ``(t, r, c) = (0, 0, 0)`` with the major axis along columns, the middle axis along rows
and the minor axis along frames. The order matches upstream's ``hilbert_to_linear`` exactly.

Locality: when every axis is even (or 1) each step moves to a face-adjacent cell. Odd axes cost a few jumps:
diagonal steps, and (when an odd axis must be cut in two) occasional steps of 2-4 cells; e.g. 32x45x80 has 32
steps of Chebyshev length 2. With ``cols == 1`` (and ``frames, rows > 1``) the curve does not start at the origin.

Conventions (all tensors are ``torch.long`` unless said otherwise):

* ``perm = gilbert_order(T, H, W)``: ``perm[i]`` is the raster index ``t*H*W + r*W + c`` of the ``i``-th cell
  along the curve, so ``x_curve = x_raster[perm]``.
* ``inv = gilbert_inverse(T, H, W)``: ``inv[perm[i]] == i`` (curve position of each raster token), so
  ``x_raster = x_curve[inv]``.

Results are cached per grid; the returned tensors are fresh copies that callers may modify.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterator

import torch

__all__ = ["gilbert_order", "gilbert_inverse", "block_neighbours"]

_Vec = tuple[int, int, int]


def _check_pos(name: str, value: int) -> int:
    """``value`` as a positive ``int`` (any integer type but bool), else ValueError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_grid(frames: int, rows: int, cols: int) -> tuple[int, int, int]:
    return _check_pos("frames", frames), _check_pos("rows", rows), _check_pos("cols", cols)


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


def _unit(v: _Vec) -> _Vec:
    return (_sgn(v[0]), _sgn(v[1]), _sgn(v[2]))


def _add(*vs: _Vec) -> _Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _neg(v: _Vec) -> _Vec:
    return (-v[0], -v[1], -v[2])


def _half(v: _Vec, length: int) -> _Vec:
    """Half of axis vector ``v`` (of ``length`` cells), rounded towards an even length when ``length > 2``."""
    h = (v[0] // 2, v[1] // 2, v[2] // 2)
    if abs(sum(h)) % 2 and length > 2:
        h = _add(h, _unit(v))
    return h


def _split(p: _Vec, a: _Vec, b: _Vec, c: _Vec) -> list[tuple[_Vec, _Vec, _Vec, _Vec]]:
    """Sub-boxes ``(origin, major, middle, minor)``, in curve order, of the box at ``p`` spanned by ``a, b, c``.

    The curve enters the box at ``p`` and leaves at the far end of the major axis ``a``. A box much longer along
    ``a`` is cut in two along ``a``; otherwise it is cut into three (halving ``b`` or ``c``, whichever is not much
    shorter) or five (halving all) sub-boxes whose curves, each entering next to where the previous one left,
    chain into one path from ``p`` to the end of ``a`` (with odd lengths the hand-over can skip a cell or more).
    Halving an axis of length 1 leaves an empty sub-box, which the walk skips.
    """
    w, h, d = abs(sum(a)), abs(sum(b)), abs(sum(c))
    da, db, dc = _unit(a), _unit(b), _unit(c)
    a2, b2, c2 = _half(a, w), _half(b, h), _half(c, d)
    ar, br, cr = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))  # the remaining halves
    a_end = _add(a, _neg(da))  # offset of the last cell along a
    if 2 * w > 3 * h and 2 * w > 3 * d:
        return [(p, a2, b, c), (_add(p, a2), ar, b, c)]
    if 3 * h > 4 * d:
        return [(p, b2, c, a2),
                (_add(p, b2), a, br, c),
                (_add(p, a_end, b2, _neg(db)), _neg(b2), c, _neg(ar))]
    if 3 * d > 4 * h:
        return [(p, c2, a2, b),
                (_add(p, c2), a, b, cr),
                (_add(p, a_end, c2, _neg(dc)), _neg(c2), _neg(ar), b)]
    c_end = _add(c, _neg(dc))
    return [(p, b2, c2, a2),
            (_add(p, b2), c, a2, br),
            (_add(p, b2, _neg(db), c_end), a, _neg(b2), _neg(cr)),
            (_add(p, a_end, b2, c_end), _neg(c), _neg(ar), br),
            (_add(p, a_end, b2, _neg(db)), _neg(b2), c2, _neg(ar))]


def _walk(a: _Vec, b: _Vec, c: _Vec) -> Iterator[_Vec]:
    """Cells ``(x, y, z)`` of the Gilbert curve of the box at the origin spanned by axis vectors ``a, b, c``.

    Uses an explicit stack (depth-first, children pushed in reverse) instead of recursion.
    """
    stack = [((0, 0, 0), a, b, c)]
    while stack:
        p, a, b, c = stack.pop()
        lengths = (abs(sum(a)), abs(sum(b)), abs(sum(c)))
        if 0 in lengths:  # an empty sub-box (a halved axis of length 1): nothing to visit
            continue
        if sorted(lengths)[1] == 1:  # at most one axis longer than 1: a straight run of cells
            step = _unit(a if lengths[0] > 1 else b if lengths[1] > 1 else c)
            x, y, z = p
            for i in range(max(lengths)):
                yield (x + i * step[0], y + i * step[1], z + i * step[2])
            continue
        stack.extend(reversed(_split(p, a, b, c)))


@functools.lru_cache(maxsize=32)
def _order_cached(frames: int, rows: int, cols: int) -> torch.Tensor:
    # x = column, y = row, z = frame; raster index = z*rows*cols + y*cols + x.
    plane = rows * cols
    flat = [z * plane + y * cols + x for x, y, z in _walk((cols, 0, 0), (0, rows, 0), (0, 0, frames))]
    return torch.tensor(flat, dtype=torch.long)


def gilbert_order(frames: int, rows: int, cols: int) -> torch.Tensor:
    """Raster index (``t*rows*cols + r*cols + c``) of each cell along the Gilbert curve: a LongTensor[N].

    ``N = frames*rows*cols``; the curve is laid out from (0, 0, 0) with major axis along cols, then rows, then
    frames (it starts at raster index 0 unless ``cols == 1 < frames, rows``).
    Works for any positive sizes (odd sizes cost a few non-adjacent steps, see the module doc). Cached per grid.
    """
    return _order_cached(*_check_grid(frames, rows, cols)).clone()


@functools.lru_cache(maxsize=32)
def _inverse_cached(frames: int, rows: int, cols: int) -> torch.Tensor:
    perm = _order_cached(frames, rows, cols)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=torch.long)
    return inv


def gilbert_inverse(frames: int, rows: int, cols: int) -> torch.Tensor:
    """Curve position of each raster token: ``inv[gilbert_order(...)[i]] == i``. A LongTensor[N], cached."""
    return _inverse_cached(*_check_grid(frames, rows, cols)).clone()


@functools.lru_cache(maxsize=32)
def _neighbours_cached(frames: int, rows: int, cols: int, block_size: int) -> torch.Tensor:
    n = frames * rows * cols
    nblk = -(-n // block_size)
    blk = (_inverse_cached(frames, rows, cols) // block_size).view(frames, rows, cols)
    mark = torch.zeros(nblk * nblk, dtype=torch.bool)
    # The 13 offsets with a positive first non-zero component (plus zero) cover each unordered pair once.
    for dt in (0, 1):
        for dr in ((0, 1) if dt == 0 else (-1, 0, 1)):
            for dc in ((0, 1) if dt == 0 and dr == 0 else (-1, 0, 1)):
                src = blk[:frames - dt, max(0, -dr):rows - max(0, dr), max(0, -dc):cols - max(0, dc)]
                dst = blk[dt:, max(0, dr):rows + min(0, dr), max(0, dc):cols + min(0, dc)]
                mark[(src * nblk + dst).reshape(-1)] = True
    mat = mark.view(nblk, nblk)
    return mat | mat.T


def block_neighbours(frames: int, rows: int, cols: int, block_size: int = 128) -> torch.Tensor:
    """Which blocks of ``block_size`` consecutive curve-order tokens touch: a symmetric BoolTensor[nblk, nblk].

    ``nblk = ceil(frames*rows*cols / block_size)`` (the last block may be short). Block ``i`` ~ block ``j`` iff
    some token of ``i`` and some token of ``j`` are 26-neighbours, i.e. at Chebyshev distance <= 1 in
    ``(t, r, c)`` (a token is its own neighbour, so the diagonal is true). Cached per grid and block size.
    """
    grid = _check_grid(frames, rows, cols)
    return _neighbours_cached(*grid, _check_pos("block_size", block_size)).clone()
