"""The ``triton`` backend: block-sparse FlashAttention-2 forward and backward over a :class:`BlockPattern`.

Forward (``triton_fwd.py``): one program per ``BLOCK_M`` query rows of one (batch, head) visits only the key
blocks of its query block's CSR row, with an online softmax in fp32; ragged tails, ``kv_lens`` and the
:class:`WindowPredicate` of partial entries are masked in-kernel with ``-inf``; it writes the output (optionally
rectified by an :class:`Epilogue`, ``out * r + o``) and the natural-log LSE.

Backward (``triton_bwd.py``), chosen design: **two kernels, no atomics.** dK/dV are computed per key tile by walking
the *transposed* pattern (``pattern.transposed()``, memoised on the pattern), dQ per query tile by walking the
forward pattern. Each output tile then has exactly one writer, so gradients are deterministic, need no fp32
scratch buffer for dQ and no zero-initialisation, and keys that no query attends get exact zeros. The price is
recomputing ``Q K^T`` and ``dO V^T`` in both kernels (about 7 instead of 5 block GEMMs per listed block), which
is the same trade FlashAttention-2's Triton ports make for determinism. ``delta = rowsum(dO * O)`` comes from a
small third kernel (fp32, without fp32 copies of O and dO). A gradient reaching the returned LSE is supported
(``dS = P * (dP - delta + dlse)``). With an epilogue, gradients flow to q/k/v (``dO_inner = dO * r``,
``delta = rowsum(dO * (out - o))``, computed in torch); gradients for the epilogue's own tensors are refused.

Tiles: a kernel's ``BLOCK_M x BLOCK_N`` tile equals or divides the pattern's ``block_q x block_kv`` (powers of two
16..256); a listed block is visited as ``block / tile`` sub-tiles in one flat loop (an unrolled inner loop made the
backward spill registers on sm_90).

Portability: on CUDA each kernel is wrapped in ``triton.autotune`` over four (tile, ``num_warps``, ``num_stages``)
configs, keyed on head dim, pattern blocks, predicate use and sequence lengths. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors with exactly one configuration (tiles = pattern blocks) and no driver query; bf16 is
upcast to fp32 inside the kernel there (the interpreter's bf16 ``tl.dot`` is wrong). fp32 dots use IEEE precision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import triton

from .epilogue import Epilogue
from .pattern import BlockPattern
from .predicates import WindowPredicate
from .triton_bwd import bwd_delta_kernel, sparse_bwd_dkdv_kernel, sparse_bwd_dq_kernel
from .triton_fwd import sparse_fwd_kernel

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_BLOCKS", "triton_sparse_attention"]

SUPPORTED_BLOCKS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETING = type(sparse_fwd_kernel).__name__ == "InterpretedFunction"

_TUNED: dict[str, Any] = {}
_TUNE_KEY = ["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "HAS_PRED", "q_len", "kv_len"]
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, sized for head dim <= 128 in bf16/fp16: checked spill-free
# for sm_90 at d = 128 (the accumulators, fwd M x D, dK/dV 2 x N x D, dQ M x D, live in registers).
_CONFIGS = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 2)],
    "dkdv": [(64, 64, 8, 1), (64, 64, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3)],
    "dq": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 3)],
}


def _fit_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Clamp each config's tiles to the pattern blocks (powers of two, so they divide them); halve for d > 128
    and for fp32 inputs; drop duplicates."""
    meta = {**named_args, **kwargs}
    shrink = (2 if meta["BLOCK_D"] > 128 else 1) * (2 if meta["DOT_PREC"] == "ieee" else 1)
    seen, out = set(), []
    for cfg in configs:
        m = max(16, min(meta["BLOCK_Q"], cfg.kwargs["BLOCK_M"] // shrink))
        n = max(16, min(meta["BLOCK_KV"], cfg.kwargs["BLOCK_N"] // shrink))
        key = (m, n, cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def _launch(kind: str, fn: Callable, rows: int, bh: int, block_q: int, block_kv: int,
            tile: tuple[int, int] | None, args: list, meta: dict) -> None:
    """Launch one kernel over ``ceil(rows / tile) x bh`` programs (tile: BLOCK_N for dkdv, else BLOCK_M).

    Interpreter: one configuration, tiles = pattern blocks. CUDA: ``triton.autotune`` over ``_CONFIGS`` (tiles,
    warps, stages), unless ``tile`` fixes the tiles (then 4 warps, 2 stages).
    """
    axis = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if INTERPRETING or tile is not None:
        bm, bn = tile or (min(block_q, 128), min(block_kv, 128))
        launch_opts = {} if INTERPRETING else {"num_warps": 4, "num_stages": 2}
        n_tile = bn if kind == "dkdv" else bm
        fn[(triton.cdiv(rows, n_tile), bh)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta, **launch_opts)
        return
    if kind not in _TUNED:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in _CONFIGS[kind]]
        _TUNED[kind] = triton.autotune(configs=configs, key=_TUNE_KEY,
                                       prune_configs_by={"early_config_prune": _fit_configs})(fn)
    _TUNED[kind][lambda m: (triton.cdiv(rows, m[axis]), bh)](*args, **meta)


def _check_tile(tile: tuple[int, int], block_q: int, block_kv: int) -> None:
    m, n = tile
    for name, t, blk in (("BLOCK_M", m, block_q), ("BLOCK_N", n, block_kv)):
        if t < 16 or t & (t - 1) or blk % t:
            raise ValueError(f"tile {name}={t} must be a power of two >= 16 dividing the pattern block {blk}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern) -> None:
    pattern.check_inputs(q, k, v)
    d = q.shape[-1]
    if v.shape[-1] != d:
        raise ValueError(f"the triton backend needs v's head dim to equal q's ({d}), got {v.shape[-1]}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={d} is not supported: accepted head dims are 1..{MAX_HEAD_DIM} "
                         "(powers of two 16..256 run unpadded, others are padded to the next power of two)")
    for name, blk in (("block_q", pattern.block_q), ("block_kv", pattern.block_kv)):
        if blk not in SUPPORTED_BLOCKS:
            raise ValueError(f"pattern {name}={blk} is not supported by the triton backend; "
                             f"use one of {SUPPORTED_BLOCKS}")
    if pattern.partial is not None and not isinstance(pattern.predicate, WindowPredicate):
        raise NotImplementedError(f"the triton backend evaluates only WindowPredicate in-kernel, not "
                                  f"{type(pattern.predicate).__name__}; use the torch or flex backend")
    dev = q.device
    if k.device != dev or v.device != dev:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if dev.type == "cuda" and INTERPRETING:
        raise RuntimeError("TRITON_INTERPRET=1 is set but the inputs are CUDA tensors: the interpreter runs on CPU "
                           "tensors only; unset TRITON_INTERPRET for CUDA")
    if dev.type == "cpu" and not INTERPRETING:
        raise RuntimeError("the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                           "before triton is first imported")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the triton backend runs on cuda (or cpu under the interpreter), not {dev.type}")


def _csr_args(pattern: BlockPattern, device: torch.device) -> tuple[list, list]:
    """Pointer and stride arguments of a pattern's CSR (group strides 0 where the pattern is broadcast)."""
    indptr = pattern.indptr.to(device).contiguous()
    indices = pattern.indices.to(device).contiguous()
    partial = indptr if pattern.partial is None else pattern.partial.to(device).contiguous().view(torch.uint8)
    bp, hp = pattern.groups
    strides = [indptr.stride(0) if bp > 1 else 0, indptr.stride(1) if hp > 1 else 0,
               indices.stride(0) if bp > 1 else 0, indices.stride(1) if hp > 1 else 0]
    return [indptr, indices, partial], strides


def _common(q: torch.Tensor, pattern: BlockPattern) -> tuple[list, list, dict]:
    """kv_lens / predicate tensors, predicate scalars and shared constexprs."""
    device = q.device
    dummy = pattern.indptr.to(device)
    kv_lens = dummy if pattern.kv_lens is None else pattern.kv_lens.to(device=device, dtype=torch.int32)
    pred = pattern.predicate if pattern.partial is not None else None
    has_pred = isinstance(pred, WindowPredicate) and pred.video_tokens > 0
    if has_pred:
        pred = pred.to(device)
        rows = pred.row_start.to(torch.int32).contiguous()
        cols = pred.col_start.to(torch.int32).contiguous()
        scalars = [pred.video_start, pred.video_tokens, pred.width, pred.height * pred.width, pred.row_len,
                   pred.col_len]
    else:
        rows, cols, scalars = dummy, dummy, [0, 1, 1, 1, 0, 0]
    d = q.shape[-1]
    meta = {"HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d)), "HAS_PRED": has_pred,
            "HAS_KVLENS": pattern.kv_lens is not None, "UPCAST": INTERPRETING and q.dtype == torch.bfloat16,
            "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32"}
    return [kv_lens, rows, cols], scalars, meta


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised ``(B, H, S, D)`` tensor backed by BSHD storage when ``t`` is a BSHD view, else BHSD."""
    b, h, s, d = t.shape
    if t.stride(2) > t.stride(1):
        return torch.empty((b, s, h, d), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((b, h, s, d), dtype=t.dtype, device=t.device)


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float, need_lse: bool,
             epilogue: Epilogue | None, tile: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = _empty_like_layout(q)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device) if need_lse else out
    csr, csr_strides = _csr_args(pattern, q.device)
    extra, scalars, meta = _common(q, pattern)
    if epilogue is not None:
        nq = pattern.num_q_blocks
        ep_s = epilogue.scale.to(q.device)
        ep_b = epilogue.bias.to(q.device)
        if ep_s.shape != (b, h, nq) or ep_b.shape != (b, h, nq, d):
            raise ValueError(f"epilogue scale must be {(b, h, nq)} and bias {(b, h, nq, d)}, "
                             f"got {tuple(ep_s.shape)} and {tuple(ep_b.shape)}")
    else:
        ep_s = ep_b = out
    ep_strides = list(ep_s.stride())[:3] + list(ep_b.stride())[:4] if epilogue is not None else [0] * 7
    with _device_guard(q):
        args = [q, k, v, out, lse, *csr, *extra, ep_s, ep_b, scale, *_strides(q, k, v, out), *csr_strides,
                *ep_strides, h, sq, sk, *scalars]
        _launch("fwd", sparse_fwd_kernel, sq, b * h, pattern.block_q, pattern.block_kv, tile, args,
                dict(meta, BLOCK_Q=pattern.block_q, BLOCK_KV=pattern.block_kv, HAS_LSE=need_lse,
                     HAS_EPI=epilogue is not None))
    return out, (lse if need_lse else None)


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, dlse: torch.Tensor | None, pattern: BlockPattern, scale: float,
              epilogue: Epilogue | None, tile: tuple[int, int] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if epilogue is not None:
        rows = torch.arange(sq, device=q.device) // pattern.block_q
        dof = dout.float()
        delta = (dof * (out.float() - epilogue.bias.to(q.device).float()[:, :, rows, :])).sum(-1)
        dout = (dof * epilogue.scale.to(q.device).float()[:, :, rows, None]).to(q.dtype)
        delta = (delta if dlse is None else delta - dlse.float()).contiguous()
    else:
        delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        dlse_arg = delta if dlse is None else dlse.float().contiguous()
        with _device_guard(q):
            bwd_delta_kernel[(triton.cdiv(sq, 64), b * h)](
                out, dout, dlse_arg, delta, *_strides(out, dout), h, sq, HEAD_DIM=d,
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=64, HAS_DLSE=dlse is not None)
    dq, dk, dv = _empty_like_layout(q), _empty_like_layout(k), _empty_like_layout(v)
    extra, scalars, meta = _common(q, pattern)
    t_pattern = pattern.transposed()
    common_strides = _strides(q, k, v, dout)
    with _device_guard(q):
        csr_t, csr_t_strides = _csr_args(t_pattern, q.device)
        csr, csr_strides = _csr_args(pattern, q.device)
        meta = dict(meta, BLOCK_Q=pattern.block_q, BLOCK_KV=pattern.block_kv)
        args = [q, k, v, dout, lse, delta, dk, dv, *csr_t, *extra, scale, *common_strides, *_strides(dk, dv),
                *csr_t_strides, h, sq, sk, *scalars]
        _launch("dkdv", sparse_bwd_dkdv_kernel, sk, b * h, pattern.block_q, pattern.block_kv, tile, args, meta)
        args = [q, k, v, dout, lse, delta, dq, *csr, *extra, scale, *common_strides, *_strides(dq),
                *csr_strides, h, sq, sk, *scalars]
        _launch("dq", sparse_bwd_dq_kernel, sq, b * h, pattern.block_q, pattern.block_kv, tile, args, meta)
    return dq, dk, dv


class _TritonSparseAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse``; backward runs the dK/dV and dQ kernels."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float,
                epilogue: Epilogue | None, tile: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _forward(q, k, v, pattern, scale, True, epilogue, tile)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale, ctx.epilogue, ctx.tile = pattern, scale, epilogue, tile
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.pattern, ctx.scale, ctx.epilogue, ctx.tile)
        return dq, dk, dv, None, None, None, None


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    epilogue: Epilogue | None = None,
    tile: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention ``softmax(q k^T * scale + mask) v`` on ``(B, H, S, D)`` tensors (any strides).

    Returns ``(out, lse)``: ``out`` in q's dtype and memory layout (a BSHD-backed view stays one), ``lse``
    ``(B, H, S_q)`` fp32 natural log when ``return_lse`` (``-inf``, with output 0, for a query with no attended
    key), else ``None``. ``epilogue`` gives ``out * r[q_block] + o[q_block]``. Differentiable in q, k, v (and
    through the LSE). ``tile=(BLOCK_M, BLOCK_N)`` overrides the kernel sub-tiles (powers of two >= 16 dividing
    the pattern's block sizes); by default they are autotuned on CUDA and equal the blocks when interpreting.
    """
    _check_inputs(q, k, v, pattern)
    if tile is not None:
        _check_tile(tile, pattern.block_q, pattern.block_kv)
    pattern = pattern.to(q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if epilogue is not None and (epilogue.scale.requires_grad or epilogue.bias.requires_grad):
            raise ValueError("the triton backend does not differentiate the epilogue's scale/bias; detach them")
        out, lse = _TritonSparseAttention.apply(q, k, v, pattern, scale, epilogue, tile)
        return out, (lse if return_lse else None)
    return _forward(q, k, v, pattern, scale, return_lse, epilogue, tile)
