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

from .triton_fwd import window_coords, window_keep


@triton.jit
def window_keep_t(k_in, ky, kx, q_in, y0, x0, row_len, col_len):
    """``(N, M)`` keep mask (keys on rows): key inside the query's window, or either token outside the video."""
    in_rows = (ky[:, None] >= y0[None, :]) & (ky[:, None] < y0[None, :] + row_len)
    in_cols = (kx[:, None] >= x0[None, :]) & (kx[:, None] < x0[None, :] + col_len)
    both_video = k_in[:, None] & q_in[None, :]
    return (in_rows & in_cols) | (both_video == 0)


@triton.jit
def sparse_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    Indptr, Indices, Partial, KvLens, RowStart, ColStart,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_pb, stride_ph, stride_ib, stride_ih,
    num_heads, q_len, kv_len,
    video_start, n_video, grid_w, hw, row_len, col_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRED: tl.constexpr, HAS_KVLENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program ``(n, b*H + h)``: dK, dV of key rows ``[n*BLOCK_N, (n+1)*BLOCK_N)``; the CSR is the transposed one."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kblk = (pid_n * BLOCK_N) // BLOCK_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    kv_lim = kv_len
    if HAS_KVLENS:
        kv_lim = tl.minimum(kv_lim, tl.load(KvLens + b))
    n_ok = offs_n < kv_lim
    kv_mask = n_ok[:, None]
    st_mask = (offs_n < kv_len)[:, None]
    if BLOCK_D != HEAD_DIM:
        kv_mask = kv_mask & d_ok[None, :]
        st_mask = st_mask & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_PRED:
        k_in, ky, kx = window_coords(offs_n, video_start, n_video, grid_w, hw)
    key_tail = pid_n * BLOCK_N + BLOCK_N > kv_lim

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_ob + h64 * stride_oh
    lse_base = Lse + pid_bh.to(tl.int64) * q_len
    delta_base = Delta + pid_bh.to(tl.int64) * q_len
    row_ptr = Indptr + b * stride_pb + h * stride_ph + kblk
    start = tl.load(row_ptr)
    end = tl.load(row_ptr + 1)
    idx_base = Indices + b * stride_ib + h * stride_ih
    part_base = Partial + b * stride_ib + h * stride_ih

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # One flat loop over (listed query block, sub-tile), as in the forward kernel.
    for it in range(start * (BLOCK_Q // BLOCK_M), end * (BLOCK_Q // BLOCK_M)):
        e = it // (BLOCK_Q // BLOCK_M)
        m0 = tl.load(idx_base + e) * BLOCK_Q + (it % (BLOCK_Q // BLOCK_M)) * BLOCK_M
        m_ok = tile_m < q_len - m0
        q_mask = m_ok[:, None]
        if BLOCK_D != HEAD_DIM:
            q_mask = q_mask & d_ok[None, :]
        rows = m0 + tile_m
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_os + offs_d[None, :] * stride_od, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Rows past q_len and rows with no attended key get lse = +inf, hence P = 0.
        lse = tl.load(lse_base + rows, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=m_ok, other=0.0)
        t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if key_tail:
            t = tl.where(n_ok[:, None], t, float("-inf"))
        if HAS_PRED:  # noqa: SIM102 (compile-time branch; the inner one is a runtime branch)
            if tl.load(part_base + e) != 0:
                q_in, qy, qx = window_coords(rows, video_start, n_video, grid_w, hw)
                y0 = tl.load(RowStart + qy)
                x0 = tl.load(ColStart + qx)
                keep = window_keep_t(k_in, ky, kx, q_in, y0, x0, row_len, col_len)
                t = tl.where(keep, t, float("-inf"))
        p = tl.math.exp2(t - lse2[None, :])
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PREC)

    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def sparse_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    Indptr, Indices, Partial, KvLens, RowStart, ColStart,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_pb, stride_ph, stride_ib, stride_ih,
    num_heads, q_len, kv_len,
    video_start, n_video, grid_w, hw, row_len, col_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRED: tl.constexpr, HAS_KVLENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program ``(m, b*H + h)``: dQ of query rows ``[m*BLOCK_M, (m+1)*BLOCK_M)`` over the forward CSR row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    qblk = (pid_m * BLOCK_M) // BLOCK_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        q_mask = q_mask & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * q_len
    lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)

    kv_lim = kv_len
    if HAS_KVLENS:
        kv_lim = tl.minimum(kv_lim, tl.load(KvLens + b))
    if HAS_PRED:
        q_in, qy, qx = window_coords(offs_m, video_start, n_video, grid_w, hw)
        y0 = tl.load(RowStart + qy)
        x0 = tl.load(ColStart + qx)

    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    row_ptr = Indptr + b * stride_pb + h * stride_ph + qblk
    start = tl.load(row_ptr)
    end = tl.load(row_ptr + 1)
    idx_base = Indices + b * stride_ib + h * stride_ih
    part_base = Partial + b * stride_ib + h * stride_ih

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(start * (BLOCK_KV // BLOCK_N), end * (BLOCK_KV // BLOCK_N)):
        e = it // (BLOCK_KV // BLOCK_N)
        n0 = tl.load(idx_base + e) * BLOCK_KV + (it % (BLOCK_KV // BLOCK_N)) * BLOCK_N
        n_ok = tile_n < kv_lim - n0
        kv_mask = n_ok[:, None]
        if BLOCK_D != HEAD_DIM:
            kv_mask = kv_mask & d_ok[None, :]
        rows = n0 + tile_n
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if n0 + BLOCK_N > kv_lim:
            t = tl.where(n_ok[None, :], t, float("-inf"))
        if HAS_PRED:  # noqa: SIM102 (compile-time branch; the inner one is a runtime branch)
            if tl.load(part_base + e) != 0:
                k_in, ky, kx = window_coords(rows, video_start, n_video, grid_w, hw)
                keep = window_keep(q_in, y0, x0, k_in, ky, kx, row_len, col_len)
                t = tl.where(keep, t, float("-inf"))
        p = tl.math.exp2(t - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

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
