"""Triton forward kernel of block-sparse attention (FlashAttention-2 online softmax over listed kv blocks).

One program computes ``BLOCK_M`` query rows of one (batch, head). It loads its query block's CSR row
``indices[indptr[r]:indptr[r+1]]`` and visits only those key blocks, ``BLOCK_KV // BLOCK_N`` sub-tiles each: first
the full entries (no predicate code at all), then the entries that need the window predicate.
With ``s = q k^T * scale`` kept in the log2 domain (``t = s * log2 e``) the running state per row is

    m' = max(m, max_j t_j),   l' = l * 2^(m - m') + sum_j 2^(t_j - m'),   acc' = acc * 2^(m - m') + 2^(t - m') v

and the program stores ``out = acc / l`` (0 where ``l = 0``), optionally rectified as ``out * r + o`` (epilogue),
and ``lse = (m + log2 l) * ln 2`` (``-inf`` where ``l = 0``). A pair is masked with ``-inf`` when its key lies
past ``min(kv_len, kv_lens[b])`` or, in an entry flagged partial, fails the window predicate. ``tune_q`` and
``tune_kv`` are unused by the kernel: they are the autotuner's bucketed sequence lengths.
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
    load_tile,
    program_coords,
    tile_mask,
)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, qk_scale, DOT_PREC: tl.constexpr):
    """One tile of the online softmax: raw scores ``s`` (``-inf`` where masked) scaled into the log2 domain by one
    multiply-add against the new running max."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, Out, Lse,
    Indptr, Indices, NFull, KvLens, RowStart, ColStart, OrderTab, EpScale, EpBias,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_pb, stride_ph, stride_ib, stride_ih,
    stride_eb, stride_eh, stride_eq,
    stride_fb, stride_fh, stride_fq, stride_fd,
    num_heads, q_len, kv_len, tune_q, tune_kv,
    video_start, n_video, grid_w, hw, row_len, col_len, has_order,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRED: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_LSE: tl.constexpr, HAS_EPI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program ``(m, b*H + h)``: output rows ``[m*BLOCK_M, (m+1)*BLOCK_M)`` of sample b, head h."""
    pid_m, pid_bh, b, h, b64, h64 = program_coords(num_heads)
    qblk = (pid_m * BLOCK_M) // BLOCK_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_mask = tile_mask(m_ok, d_ok, HEAD_DIM, BLOCK_D)
    q = load_tile(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qs, stride_qd, q_mask, UPCAST)
    kv = (K + b64 * stride_kb + h64 * stride_kh, V + b64 * stride_vb + h64 * stride_vh,
          stride_ks, stride_kd, stride_vs, stride_vd)

    kv_lim = kv_limit(kv_len, KvLens, b, HAS_KVLENS)
    win = (RowStart, ColStart, video_start, n_video, grid_w, hw, row_len, col_len, OrderTab, has_order)
    q_win = fixed_window_side(offs_m, win, True, HAS_PRED)
    start, split, end, idx_base = csr_row(Indptr, Indices, NFull, b, h, qblk,
                                          stride_pb, stride_ph, stride_ib, stride_ih, HAS_PRED)

    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Flat loops over (listed block, sub-tile): full entries with no predicate work, then the partial ones.
    steps = BLOCK_KV // BLOCK_N
    for it in range(start * steps, split * steps):
        k, v, s = kv_tile_step(it, q, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, win,
                               HEAD_DIM, BLOCK_D, BLOCK_KV, BLOCK_N, False, UPCAST, DOT_PREC)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, qk_scale, DOT_PREC)
    if HAS_PRED:
        for it in range(split * steps, end * steps):
            k, v, s = kv_tile_step(it, q, q_win, kv, idx_base, tile_n, offs_d, d_ok, kv_lim, win,
                                   HEAD_DIM, BLOCK_D, BLOCK_KV, BLOCK_N, True, UPCAST, DOT_PREC)
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, qk_scale, DOT_PREC)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if HAS_EPI:
        r = tl.load(EpScale + b64 * stride_eb + h64 * stride_eh + qblk * stride_eq).to(tl.float32)
        o_nc = tl.load(EpBias + b64 * stride_fb + h64 * stride_fh + qblk * stride_fq + offs_d * stride_fd,
                       mask=d_ok, other=0.0).to(tl.float32)
        out = out * r + o_nc[None, :]
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    if HAS_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=m_ok)
