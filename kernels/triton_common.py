"""``@triton.jit`` helpers shared by the forward (``triton_fwd.py``) and backward (``triton_bwd.py``) kernels.

They hold what every kernel does per tile: the CSR row walk (full entries first, then partial ones), tile loads
(row/head-dim masks, the interpreter's bf16 upcast), the ``kv_lens`` limit and the masked raw scores ``q k^T``
(``-inf`` at keys past the limit and, in the loop over partial entries, at pairs failing the window predicate).
The kernels scale them in the log2 domain with one multiply-add against the running max or the saved LSE. Triton inlines these
calls, so each kernel keeps its single flat loop over sub-tiles (see triton_attention.py).

Orientation: the forward and dQ kernels hold queries on the tile's rows and visit key tiles; the dK/dV kernel holds
keys on the rows and visits query tiles (``KEYS_ON_ROWS``), so its score tile is the transpose ``(N, M)``.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def window_coords(idx, video_start, n_video, grid_w, hw, OrderTab, has_order):
    """Video membership and (row, col) of token indices (rows/cols 0 off the video). The video tokens are
    frame-major raster, or with ``has_order`` in the order ``OrderTab`` gives (``OrderTab[i]`` = raster index of the
    i-th video token: spatial tiles)."""
    rel = idx - video_start
    inside = (rel >= 0) & (rel < n_video)
    raster = tl.minimum(tl.maximum(rel, 0), n_video - 1)
    if has_order != 0:
        raster = tl.load(OrderTab + raster)
    pos = raster % hw
    return inside, pos // grid_w, pos % grid_w


@triton.jit
def window_keep(q_in, y0, x0, k_in, ky, kx, row_len, col_len):
    """``(M, N)`` keep mask: key inside the query's window, or either token outside the video."""
    in_rows = (ky[None, :] >= y0[:, None]) & (ky[None, :] < y0[:, None] + row_len)
    in_cols = (kx[None, :] >= x0[:, None]) & (kx[None, :] < x0[:, None] + col_len)
    both_video = q_in[:, None] & k_in[None, :]
    return (in_rows & in_cols) | (both_video == 0)


@triton.jit
def window_keep_t(k_in, ky, kx, q_in, y0, x0, row_len, col_len):
    """``(N, M)`` keep mask (keys on rows): key inside the query's window, or either token outside the video."""
    in_rows = (ky[:, None] >= y0[None, :]) & (ky[:, None] < y0[None, :] + row_len)
    in_cols = (kx[:, None] >= x0[None, :]) & (kx[:, None] < x0[None, :] + col_len)
    both_video = k_in[:, None] & q_in[None, :]
    return (in_rows & in_cols) | (both_video == 0)


@triton.jit
def window_side(idx, win, IS_QUERY: tl.constexpr):
    """Window operands ``(inside, y, x)`` of tokens ``idx``; for queries ``y, x`` are their window's first row/col
    (``RowStart[row]``, ``ColStart[col]``), for keys their own row/col. ``win`` is the kernel's window tuple
    ``(RowStart, ColStart, video_start, n_video, grid_w, hw, row_len, col_len, OrderTab, has_order)``."""
    RowStart, ColStart, video_start, n_video, grid_w, hw, row_len, col_len, OrderTab, has_order = win
    inside, y, x = window_coords(idx, video_start, n_video, grid_w, hw, OrderTab, has_order)
    if IS_QUERY:
        y = tl.load(RowStart + y)
        x = tl.load(ColStart + x)
    return inside, y, x


@triton.jit
def fixed_window_side(idx, win, IS_QUERY: tl.constexpr, HAS_PRED: tl.constexpr):
    """:func:`window_side` of a program's own rows, or unused placeholders without a predicate."""
    if HAS_PRED:
        inside, y, x = window_side(idx, win, IS_QUERY)
    else:
        inside, y, x = idx >= 0, idx, idx
    return inside, y, x


@triton.jit
def program_coords(num_heads):
    """``(pid, pid_bh, b, h, b64, h64)`` of a program on the ``(tiles, batch * heads)`` grid."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    return pid, pid_bh, b, h, b.to(tl.int64), h.to(tl.int64)


@triton.jit
def kv_limit(kv_len, KvLens, b, HAS_KVLENS: tl.constexpr):
    """Number of valid keys of sample ``b``: ``min(kv_len, kv_lens[b])``."""
    kv_lim = kv_len
    if HAS_KVLENS:
        kv_lim = tl.minimum(kv_lim, tl.load(KvLens + b))
    return kv_lim


@triton.jit
def csr_row(Indptr, Indices, NFull, b, h, row, stride_pb, stride_ph, stride_ib, stride_ih, HAS_PRED: tl.constexpr):
    """``(start, split, end, idx_base)`` of CSR row ``row`` of group ``(b, h)``: entries ``[start, split)`` are full
    blocks, ``[split, end)`` need the predicate (the triton CSR lists a row's full entries first; ``NFull`` shares
    ``Indptr``'s strides and holds each row's count of full entries). Without a predicate ``split = end``."""
    row_off = b * stride_pb + h * stride_ph + row
    start = tl.load(Indptr + row_off)
    end = tl.load(Indptr + row_off + 1)
    split = end
    if HAS_PRED:
        split = start + tl.load(NFull + row_off)
    return start, split, end, Indices + b * stride_ib + h * stride_ih


@triton.jit
def sub_tile(it, idx_base, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Flat-loop step ``it`` -> first token of sub-tile ``it % (BLOCK / TILE)`` of entry ``it // (BLOCK / TILE)``
    of the CSR row."""
    return tl.load(idx_base + it // (BLOCK // TILE)) * BLOCK + (it % (BLOCK // TILE)) * TILE


@triton.jit
def tile_mask(row_ok, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(rows, BLOCK_D)`` load/store mask: valid rows, and valid head-dim columns when the dim is padded."""
    mask = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & d_ok[None, :]
    return mask


@triton.jit
def load_tile(base, rows, offs_d, stride_s, stride_d, mask, UPCAST: tl.constexpr):
    """``(rows, BLOCK_D)`` tile (0 where masked), upcast to fp32 under ``UPCAST``."""
    x = tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_tiles(pair, rows, offs_d, mask, UPCAST: tl.constexpr):
    """Two row-aligned tiles with one mask, ``(k, v)`` or ``(q, dO)``; ``pair`` is
    ``(a_base, b_base, stride_as, stride_ad, stride_bs, stride_bd)``."""
    a_base, b_base, stride_as, stride_ad, stride_bs, stride_bd = pair
    a = load_tile(a_base, rows, offs_d, stride_as, stride_ad, mask, UPCAST)
    b = load_tile(b_base, rows, offs_d, stride_bs, stride_bd, mask, UPCAST)
    return a, b


@triton.jit
def load_lse_delta(Lse, Delta, rows, row_ok):
    """Saved LSE in the log2 domain (``+inf``, hence ``P = 0``, for rows past q_len or with no attended key) and
    ``delta`` (0 past q_len) of query rows ``rows``."""
    lse = tl.load(Lse + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    return lse2, tl.load(Delta + rows, mask=row_ok, other=0.0)


@triton.jit
def tile_scores(a, b, key_ok, key_tail, fixed, visit_rows, win,
                APPLY_PRED: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Masked raw scores ``a b^T`` (unscaled: callers fold the scale into one multiply-add with the running max) of
    the program's tile ``a`` against a visited tile ``b``.

    ``a`` holds queries and ``b`` keys, or with ``KEYS_ON_ROWS`` ``a`` keys and ``b`` queries. Keys where ``key_ok``
    is false get ``-inf`` when ``key_tail`` (the tile reaches past the kv limit). With ``APPLY_PRED`` (the loop over
    a row's partial entries) pairs outside the window get ``-inf``: ``fixed`` holds the program's own
    :func:`window_side` operands, the visited tokens ``visit_rows`` get theirs here.
    """
    t = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    if key_tail:
        if KEYS_ON_ROWS:
            t = tl.where(key_ok[:, None], t, float("-inf"))
        else:
            t = tl.where(key_ok[None, :], t, float("-inf"))
    if APPLY_PRED:
        f_in, fy, fx = fixed
        v_in, vy, vx = window_side(visit_rows, win, KEYS_ON_ROWS)
        row_len = win[6]
        col_len = win[7]
        if KEYS_ON_ROWS:
            keep = window_keep_t(f_in, fy, fx, v_in, vy, vx, row_len, col_len)
        else:
            keep = window_keep(f_in, fy, fx, v_in, vy, vx, row_len, col_len)
        t = tl.where(keep, t, float("-inf"))
    return t


@triton.jit
def kv_tile_step(it, q, fixed, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, win,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
                 APPLY_PRED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Flat-loop step ``it`` of a query-tile program (forward, dQ): the visited key tile's ``k``, ``v`` (0 past the
    kv limit; ``kv`` is the :func:`load_tiles` pair) and masked raw scores ``s`` ``(M, N)`` against ``q``."""
    n0 = sub_tile(it, idx_base, BLOCK_KV, BLOCK_N)
    n_ok = tile_n < kv_lim - n0
    rows = n0 + tile_n
    k, v = load_tiles(kv, rows, offs_d, tile_mask(n_ok, d_ok, HEAD_DIM, BLOCK_D), UPCAST)
    s = tile_scores(q, k, n_ok, n0 + BLOCK_N > kv_lim, fixed, rows, win, APPLY_PRED, False, DOT_PREC)
    return k, v, s
