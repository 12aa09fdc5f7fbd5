"""Triton backward kernels of block-sparse attention: one for dK/dV (per key tile), one for dQ (per query tile).

With ``P = exp(S - lse)`` recomputed from the saved log-sum-exp and ``delta_i = sum_d dO_id O_id`` (minus the
incoming ``dlse_i`` when the LSE itself receives a gradient):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

The dK/dV kernel walks the *transposed* pattern (key block -> query blocks), the dQ kernel the forward pattern, so
every output tile is owned by exactly one program: no atomics, deterministic results (see triton_attention.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    LOG2E,
    csr_row,
    fixed_window_side,
    kv_limit,
    kv_tile_step,
    load_lse_delta,
    load_tiles,
    program_coords,
    sub_tile,
    tile_mask,
    tile_scores,
)


@triton.jit
def dkdv_step(it, dk, dv, keys, rows_ctx, idx_base, qk_scale, win,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
              APPLY_PRED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Flat-loop step ``it`` of the dK/dV program: accumulate the visited query tile's contribution."""
    k, v, n_ok, key_tail, k_win = keys
    qdo, lse_base, delta_base, tile_m, offs_d, d_ok, q_len = rows_ctx
    m0 = sub_tile(it, idx_base, BLOCK_Q, BLOCK_M)
    m_ok = tile_m < q_len - m0
    rows = m0 + tile_m
    q, do = load_tiles(qdo, rows, offs_d, tile_mask(m_ok, d_ok, HEAD_DIM, BLOCK_D), UPCAST)
    lse2, delta = load_lse_delta(lse_base, delta_base, rows, m_ok)
    s = tile_scores(k, q, n_ok, key_tail, k_win, rows, win, APPLY_PRED, True, DOT_PREC)
    p = tl.math.exp2(s * qk_scale - lse2[None, :])
    dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PREC)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds = p * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def dq_step(it, dq, q, do, lse2, delta, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, qk_scale, win,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
            APPLY_PRED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Flat-loop step ``it`` of the dQ program: accumulate the visited key tile's contribution."""
    k, v, s = kv_tile_step(it, q, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, win,
                           HEAD_DIM, BLOCK_D, BLOCK_KV, BLOCK_N, APPLY_PRED, UPCAST, DOT_PREC)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def sparse_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    Indptr, Indices, NFull, KvLens, RowStart, ColStart, OrderTab,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_pb, stride_ph, stride_ib, stride_ih,
    num_heads, q_len, kv_len, tune_q, tune_kv,
    video_start, n_video, grid_w, hw, row_len, col_len, has_order,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRED: tl.constexpr, HAS_KVLENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program ``(n, b*H + h)``: dK, dV of key rows ``[n*BLOCK_N, (n+1)*BLOCK_N)``; the CSR is the transposed one."""
    pid_n, pid_bh, b, h, b64, h64 = program_coords(num_heads)
    kblk = (pid_n * BLOCK_N) // BLOCK_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    kv_lim = kv_limit(kv_len, KvLens, b, HAS_KVLENS)
    n_ok = offs_n < kv_lim
    st_mask = tile_mask(offs_n < kv_len, d_ok, HEAD_DIM, BLOCK_D)
    k, v = load_tiles((K + b64 * stride_kb + h64 * stride_kh, V + b64 * stride_vb + h64 * stride_vh,
                       stride_ks, stride_kd, stride_vs, stride_vd),
                      offs_n, offs_d, tile_mask(n_ok, d_ok, HEAD_DIM, BLOCK_D), UPCAST)
    win = (RowStart, ColStart, video_start, n_video, grid_w, hw, row_len, col_len, OrderTab, has_order)
    k_win = fixed_window_side(offs_n, win, False, HAS_PRED)
    key_tail = pid_n * BLOCK_N + BLOCK_N > kv_lim

    qdo = (Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_ob + h64 * stride_oh,
           stride_qs, stride_qd, stride_os, stride_od)
    lse_base = Lse + pid_bh.to(tl.int64) * q_len
    delta_base = Delta + pid_bh.to(tl.int64) * q_len
    start, split, end, idx_base = csr_row(Indptr, Indices, NFull, b, h, kblk,
                                          stride_pb, stride_ph, stride_ib, stride_ih, HAS_PRED)

    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    rows_ctx = (qdo, lse_base, delta_base, tile_m, offs_d, d_ok, q_len)
    keys = (k, v, n_ok, key_tail, k_win)
    # Flat loops over (listed query block, sub-tile), as in the forward kernel: full entries, then partial ones.
    steps = BLOCK_Q // BLOCK_M
    for it in range(start * steps, split * steps):
        dk, dv = dkdv_step(it, dk, dv, keys, rows_ctx, idx_base, qk_scale, win,
                           HEAD_DIM, BLOCK_D, BLOCK_Q, BLOCK_M, False, UPCAST, DOT_PREC)
    if HAS_PRED:
        for it in range(split * steps, end * steps):
            dk, dv = dkdv_step(it, dk, dv, keys, rows_ctx, idx_base, qk_scale, win,
                               HEAD_DIM, BLOCK_D, BLOCK_Q, BLOCK_M, True, UPCAST, DOT_PREC)

    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def sparse_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    Indptr, Indices, NFull, KvLens, RowStart, ColStart, OrderTab,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_pb, stride_ph, stride_ib, stride_ih,
    num_heads, q_len, kv_len, tune_q, tune_kv,
    video_start, n_video, grid_w, hw, row_len, col_len, has_order,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRED: tl.constexpr, HAS_KVLENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program ``(m, b*H + h)``: dQ of query rows ``[m*BLOCK_M, (m+1)*BLOCK_M)`` over the forward CSR row."""
    pid_m, pid_bh, b, h, b64, h64 = program_coords(num_heads)
    qblk = (pid_m * BLOCK_M) // BLOCK_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_mask = tile_mask(m_ok, d_ok, HEAD_DIM, BLOCK_D)
    q, do = load_tiles((Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_ob + h64 * stride_oh,
                        stride_qs, stride_qd, stride_os, stride_od), offs_m, offs_d, q_mask, UPCAST)
    row_base = pid_bh.to(tl.int64) * q_len
    lse2, delta = load_lse_delta(Lse + row_base, Delta + row_base, offs_m, m_ok)

    kv_lim = kv_limit(kv_len, KvLens, b, HAS_KVLENS)
    win = (RowStart, ColStart, video_start, n_video, grid_w, hw, row_len, col_len, OrderTab, has_order)
    q_win = fixed_window_side(offs_m, win, True, HAS_PRED)
    kv = (K + b64 * stride_kb + h64 * stride_kh, V + b64 * stride_vb + h64 * stride_vh,
          stride_ks, stride_kd, stride_vs, stride_vd)
    start, split, end, idx_base = csr_row(Indptr, Indices, NFull, b, h, qblk,
                                          stride_pb, stride_ph, stride_ib, stride_ih, HAS_PRED)

    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    steps = BLOCK_KV // BLOCK_N
    for it in range(start * steps, split * steps):
        dq = dq_step(it, dq, q, do, lse2, delta, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, qk_scale, win,
                     HEAD_DIM, BLOCK_D, BLOCK_KV, BLOCK_N, False, UPCAST, DOT_PREC)
    if HAS_PRED:
        for it in range(split * steps, end * steps):
            dq = dq_step(it, dq, q, do, lse2, delta, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, qk_scale,
                         win, HEAD_DIM, BLOCK_D, BLOCK_KV, BLOCK_N, True, UPCAST, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def bwd_delta_kernel(
    Out, DO, DLse, Delta,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    num_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Program ``(m, b*H + h)``: ``delta = rowsum(dO * O) - dlse`` in fp32 for rows ``[m*BLOCK_M, (m+1)*BLOCK_M)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // num_heads).to(tl.int64)
    h64 = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    rows = pid_bh.to(tl.int64) * q_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + rows, mask=m_ok, other=0.0)
    tl.store(Delta + rows, delta, mask=m_ok)
