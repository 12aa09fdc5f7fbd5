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
    d_ok = offs_d < HEAD_DIM
    kv_lim = kv_len
    if HAS_KVLENS:
        kv_lim = tl.minimum(kv_lim, tl.load(KvLens + b))
    n_ok = offs_n < kv_lim
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_PRED:
        k_in, ky, kx = window_coords(offs_n, video_start, n_video, grid_w, hw)

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_ob + h64 * stride_oh
    row_base = pid_bh.to(tl.int64) * q_len
    row_ptr = Indptr + b * stride_pb + h * stride_ph + kblk
    start = tl.load(row_ptr)
    end = tl.load(row_ptr + 1)
    idx_base = Indices + b * stride_ib + h * stride_ih
    part_base = Partial + b * stride_ib + h * stride_ih

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for e in range(start, end):
        qb = tl.load(idx_base + e)
        if HAS_PRED:
            part = tl.load(part_base + e)
        for sub in tl.static_range(BLOCK_Q // BLOCK_M):
            offs_m = qb * BLOCK_Q + sub * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < q_len
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=q_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
            t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            t = tl.where(n_ok[:, None], t, float("-inf"))
            if HAS_PRED:
                if part != 0:
                    q_in, qy, qx = window_coords(offs_m, video_start, n_video, grid_w, hw)
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
    st_mask = (offs_n < kv_len)[:, None] & d_ok[None, :]
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
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
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
    for e in range(start, end):
        kb = tl.load(idx_base + e)
        if HAS_PRED:
            part = tl.load(part_base + e)
        for sub in tl.static_range(BLOCK_KV // BLOCK_N):
            offs_n = kb * BLOCK_KV + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_lim
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            t = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            t = tl.where(n_ok[None, :], t, float("-inf"))
            if HAS_PRED:
                if part != 0:
                    k_in, ky, kx = window_coords(offs_n, video_start, n_video, grid_w, hw)
                    keep = window_keep(q_in, y0, x0, k_in, ky, kx, row_len, col_len)
                    t = tl.where(keep, t, float("-inf"))
            p = tl.math.exp2(t - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
