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

Portability: on CUDA each kernel is wrapped in ``triton.autotune`` over ``KERNEL_CONFIGS`` (tile, ``num_warps``,
``num_stages``) as fitted to the call by ``fit_configs`` (no config over the device's shared memory), keyed on head
dim, pattern blocks, predicate use, dtype and power-of-two buckets of the sequence lengths; results persist across
processes where the installed Triton supports ``cache_results``. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors with exactly one configuration (tiles = pattern blocks) and no driver query; bf16 is
upcast to fp32 inside the kernel there (the interpreter's bf16 ``tl.dot`` is wrong). fp32 dots use IEEE precision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import triton

from .epilogue import Epilogue
from .pattern import BlockPattern
from .predicates import PermutedPredicate, WindowPredicate
from .triton_bwd import bwd_delta_kernel, sparse_bwd_dkdv_kernel, sparse_bwd_dq_kernel
from .triton_fwd import sparse_fwd_kernel

__all__ = ["KERNEL_CONFIGS", "MAX_HEAD_DIM", "SUPPORTED_BLOCKS", "KernelConfig", "fit_configs", "smem_estimate",
           "triton_sparse_attention"]

SUPPORTED_BLOCKS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETING = type(sparse_fwd_kernel).__name__ == "InterpretedFunction"

_TUNED: dict[str, Any] = {}
# Autotuning keys: head dim, pattern blocks, the kernel variant (predicate, kv_lens, LSE, epilogue; keys a kernel
# lacks are ignored), input dtype and the sequence lengths bucketed to powers of two (``tune_q``, ``tune_kv``), so
# a new resolution of similar size reuses the tuned choice. Not keyed: the pattern's density (the first pattern
# tuned at a length sets the config for all densities there).
_TUNE_KEY = ["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "HAS_PRED", "HAS_KVLENS", "HAS_LSE", "HAS_EPI", "DOT_PREC", "tune_q",
             "tune_kv"]
SMEM_LIMIT_SM90 = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


class KernelConfig(NamedTuple):
    """One launch configuration: tile ``block_m x block_n`` (queries x keys), ``warps``, pipeline ``stages``."""

    block_m: int
    block_n: int
    warps: int
    stages: int


# Candidates per kernel, written for head dim <= 128 in bf16/fp16 (``fit_configs`` adapts them to a call). The
# row tile (fwd, dQ: block_m; dK/dV: block_n, keys on rows) is 128 where the blocks allow, with 8 warps (two
# warpgroups of 64 rows on sm_90); a row tile of 64 runs on 4 warps. Checked spill-free for sm_90a at d = 64 and
# 128, bf16 and fp16, with and without the window predicate, by ``benchmarks/sm90_compile_check.py`` (Triton 3.6
# and 3.9). Left out because they spill with Triton 3.9's ptxas at d = 128 (255 registers): fwd 128x128 at 8 warps
# and dK/dV 64x128 at 8 warps, dK/dV 64x64 at 4 warps.
KERNEL_CONFIGS: dict[str, tuple[KernelConfig, ...]] = {
    "fwd": (KernelConfig(128, 64, 8, 2), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2),
            KernelConfig(64, 64, 4, 3)),
    "dkdv": (KernelConfig(32, 128, 8, 2), KernelConfig(32, 128, 8, 3), KernelConfig(32, 64, 4, 2),
             KernelConfig(32, 64, 4, 3)),
    "dq": (KernelConfig(128, 64, 8, 2), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2),
           KernelConfig(64, 32, 4, 3)),
}


def smem_estimate(kind: str, cfg: KernelConfig, block_d: int, elt: int) -> int:
    """Upper estimate of a config's shared memory in bytes: the pipelined tiles (``stages`` copies of the visited
    pair: k/v, or q/dO for dK/dV), the program's own tile(s) and one ``block_m x block_n`` staging tile (P or dS
    on its way to the second matrix product)."""
    m, n = cfg.block_m, cfg.block_n
    visited, own = (m, n) if kind == "dkdv" else (n, m)
    own_tiles = 1 if kind == "fwd" else 2
    return (cfg.stages * 2 * visited + own_tiles * own) * block_d * elt + m * n * elt


def fit_configs(kind: str, *, block_q: int, block_kv: int, head_dim: int, dtype: torch.dtype,
                smem_limit: int = SMEM_LIMIT_SM90) -> list[KernelConfig]:
    """The launchable configs of ``kind`` for a call: tiles clamped to the pattern blocks (powers of two, so they
    divide them) and halved for head dims > 128 and fp32 inputs; 4 warps where the row tile is <= 64; stages
    lowered until :func:`smem_estimate` fits ``smem_limit`` (a config that cannot fit with one stage is dropped);
    duplicates removed. Never empty: the smallest tiles are the last resort."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    elt = torch.empty((), dtype=dtype).element_size()
    shrink = (2 if block_d > 128 else 1) * (2 if dtype == torch.float32 else 1)
    out: list[KernelConfig] = []
    for cfg in KERNEL_CONFIGS[kind]:
        m = max(16, min(block_q, cfg.block_m // shrink))
        n = max(16, min(block_kv, cfg.block_n // shrink))
        row_tile = n if kind == "dkdv" else m
        fitted = KernelConfig(m, n, cfg.warps if row_tile > 64 else 4, cfg.stages)
        while fitted.stages > 1 and smem_estimate(kind, fitted, block_d, elt) > smem_limit:
            fitted = fitted._replace(stages=fitted.stages - 1)
        if smem_estimate(kind, fitted, block_d, elt) <= smem_limit and fitted not in out:
            out.append(fitted)
    return out or [KernelConfig(16, 16, 4, 1)]


def _tune_bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _smem_limit(device: torch.device) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return int(props.get("max_shared_mem", SMEM_LIMIT_SM90))


def _prune(kind: str) -> Callable:
    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        meta = {**named_args, **kwargs}
        dtype = meta["Q"].dtype
        limit = _smem_limit(meta["Q"].device)
        fitted = fit_configs(kind, block_q=meta["BLOCK_Q"], block_kv=meta["BLOCK_KV"], head_dim=meta["HEAD_DIM"],
                             dtype=dtype, smem_limit=limit)
        return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.warps, num_stages=c.stages)
                for c in fitted]
    return prune


def _autotuned(kind: str, fn: Callable) -> Any:
    if kind not in _TUNED:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.warps,
                                 num_stages=c.stages) for c in KERNEL_CONFIGS[kind]]
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        _TUNED[kind] = triton.autotune(configs=configs, key=_TUNE_KEY,
                                       prune_configs_by={"early_config_prune": _prune(kind)}, **extra)(fn)
    return _TUNED[kind]


def _launch(kind: str, fn: Callable, rows: int, bh: int, block_q: int, block_kv: int,
            config: KernelConfig | None, args: list, meta: dict) -> None:
    """Launch one kernel over ``ceil(rows / row tile) x bh`` programs (row tile: BLOCK_N for dkdv, else BLOCK_M).

    Interpreter: one configuration, tiles = pattern blocks (at most 128). CUDA: ``triton.autotune`` over
    :func:`fit_configs`, unless ``config`` fixes the launch.
    """
    axis = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if INTERPRETING and config is None:
        config = KernelConfig(min(block_q, 128), min(block_kv, 128), 4, 1)
    if config is not None:
        launch_opts = {} if INTERPRETING else {"num_warps": config.warps, "num_stages": config.stages}
        row_tile = config.block_n if kind == "dkdv" else config.block_m
        fn[(triton.cdiv(rows, row_tile), bh)](*args, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **meta,
                                              **launch_opts)
        return
    _autotuned(kind, fn)[lambda m: (triton.cdiv(rows, m[axis]), bh)](*args, **meta)


def _resolve_configs(tile: tuple[int, int] | None, configs: Mapping[str, tuple] | None, block_q: int,
                     block_kv: int) -> dict[str, KernelConfig | None]:
    """Per kernel, the fixed launch config of a call (``None``: autotuned / the interpreter's)."""
    fixed: dict[str, KernelConfig | None] = dict.fromkeys(KERNEL_CONFIGS)
    if tile is not None:
        _check_tile(tile, block_q, block_kv)
        fixed = dict.fromkeys(KERNEL_CONFIGS, KernelConfig(*tile, 4, 2))
    for kind, cfg in (configs or {}).items():
        if kind not in KERNEL_CONFIGS:
            raise ValueError(f"configs keys must be among {sorted(KERNEL_CONFIGS)}, got {kind!r}")
        cfg = KernelConfig(*cfg)
        _check_tile((cfg.block_m, cfg.block_n), block_q, block_kv)
        if cfg.warps not in (1, 2, 4, 8, 16) or cfg.stages < 1:
            raise ValueError(f"config {cfg} needs warps in (1, 2, 4, 8, 16) and stages >= 1")
        fixed[kind] = cfg
    return fixed


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
    if pattern.partial is not None and kernel_window(pattern.predicate) is None:
        raise NotImplementedError(f"the triton backend evaluates only WindowPredicate (raster, or permuted among the "
                                  f"video tokens) in-kernel, not {type(pattern.predicate).__name__}; use the torch "
                                  "or flex backend")
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


def _full_first(pattern: BlockPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, nfull)``: the pattern's CSR with each row's full entries before its partial ones (order within
    a row is free for the online softmax) and, in ``indptr``'s shape, each row's count of full entries. Memoised
    on the pattern; a pattern without partial entries is returned as is (``nfull`` unused)."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        indptr, indices, partial = pattern.indptr, pattern.indices, pattern.partial
        if partial is None:
            return indices, indptr
        nnz = indices.shape[-1]
        pos = torch.arange(nnz, device=indices.device).expand_as(indices).contiguous()
        row = torch.searchsorted(indptr[..., 1:].long().contiguous(), pos, right=True)  # entries past the end: row nq
        order = torch.sort(row * 2 + partial.to(row.dtype), dim=-1, stable=True).indices
        counts = torch.zeros_like(indptr)
        counts[..., :-1] = indptr[..., 1:] - indptr[..., :-1]
        n_part = torch.zeros_like(indptr, dtype=torch.int64).scatter_add_(-1, row, partial.to(torch.int64))
        return torch.gather(indices, -1, order).contiguous(), (counts - n_part).to(torch.int32).contiguous()
    return pattern.memo(("triton_full_first",), build)


def _csr_args(pattern: BlockPattern, device: torch.device) -> tuple[list, list]:
    """Pointer and stride arguments of a pattern's CSR, full entries first (group strides 0 where the pattern is
    broadcast)."""
    indptr = pattern.indptr.to(device).contiguous()
    indices, nfull = (t.to(device) for t in _full_first(pattern))
    bp, hp = pattern.groups
    strides = [indptr.stride(0) if bp > 1 else 0, indptr.stride(1) if hp > 1 else 0,
               indices.stride(0) if bp > 1 else 0, indices.stride(1) if hp > 1 else 0]
    return [indptr, indices, nfull], strides


def kernel_window(predicate: object) -> tuple[WindowPredicate, torch.Tensor | None] | None:
    """The in-kernel form of a predicate: ``(window, order table or None)`` for a :class:`WindowPredicate`, or a
    :class:`PermutedPredicate` of one that permutes only the video tokens among themselves (spatial tiles: the
    table gives the raster index of each video token); ``None`` for predicates the kernel cannot evaluate."""
    if isinstance(predicate, WindowPredicate):
        return predicate, None
    if isinstance(predicate, PermutedPredicate) and isinstance(predicate.base, WindowPredicate):
        window, perm = predicate.base, predicate.perm
        start, n = window.video_start, window.video_tokens
        table = perm[start:start + n] - start
        return window, table.to(torch.int32).contiguous()
    return None


def _common(q: torch.Tensor, pattern: BlockPattern) -> tuple[list, list, dict]:
    """kv_lens / predicate tensors, predicate scalars and shared constexprs."""
    device = q.device
    dummy = pattern.indptr.to(device)
    kv_lens = dummy if pattern.kv_lens is None else pattern.kv_lens.to(device=device, dtype=torch.int32)
    found = kernel_window(pattern.predicate.to(device) if pattern.partial is not None else None)
    has_pred = found is not None and found[0].video_tokens > 0
    if has_pred:
        pred, order = found
        rows = pred.row_start.to(torch.int32).contiguous()
        cols = pred.col_start.to(torch.int32).contiguous()
        order_arg = dummy if order is None else order
        scalars = [pred.video_start, pred.video_tokens, pred.width, pred.height * pred.width, pred.row_len,
                   pred.col_len, int(order is not None)]
    else:
        rows, cols, order_arg, scalars = dummy, dummy, dummy, [0, 1, 1, 1, 0, 0, 0]
    d = q.shape[-1]
    meta = {"HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d)), "HAS_PRED": has_pred,
            "HAS_KVLENS": pattern.kv_lens is not None, "UPCAST": INTERPRETING and q.dtype == torch.bfloat16,
            "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32"}
    return [kv_lens, rows, cols, order_arg], scalars, meta


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
             epilogue: Epilogue | None, fixed: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
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
                *ep_strides, h, sq, sk, _tune_bucket(sq), _tune_bucket(sk), *scalars]
        _launch("fwd", sparse_fwd_kernel, sq, b * h, pattern.block_q, pattern.block_kv, fixed["fwd"], args,
                dict(meta, BLOCK_Q=pattern.block_q, BLOCK_KV=pattern.block_kv, HAS_LSE=need_lse,
                     HAS_EPI=epilogue is not None))
    return out, (lse if need_lse else None)


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, dlse: torch.Tensor | None, pattern: BlockPattern, scale: float,
              epilogue: Epilogue | None, fixed: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
                *csr_t_strides, h, sq, sk, _tune_bucket(sq), _tune_bucket(sk), *scalars]
        _launch("dkdv", sparse_bwd_dkdv_kernel, sk, b * h, pattern.block_q, pattern.block_kv, fixed["dkdv"], args,
                meta)
        args = [q, k, v, dout, lse, delta, dq, *csr, *extra, scale, *common_strides, *_strides(dq),
                *csr_strides, h, sq, sk, _tune_bucket(sq), _tune_bucket(sk), *scalars]
        _launch("dq", sparse_bwd_dq_kernel, sq, b * h, pattern.block_q, pattern.block_kv, fixed["dq"], args, meta)
    return dq, dk, dv


class _TritonSparseAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse``; backward runs the dK/dV and dQ kernels."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, scale: float,
                epilogue: Epilogue | None, fixed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _forward(q, k, v, pattern, scale, True, epilogue, fixed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale, ctx.epilogue, ctx.fixed = pattern, scale, epilogue, fixed
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.pattern, ctx.scale, ctx.epilogue, ctx.fixed)
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
    configs: Mapping[str, tuple] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention ``softmax(q k^T * scale + mask) v`` on ``(B, H, S, D)`` tensors (any strides).

    Returns ``(out, lse)``: ``out`` in q's dtype and memory layout (a BSHD-backed view stays one), ``lse``
    ``(B, H, S_q)`` fp32 natural log when ``return_lse`` (``-inf``, with output 0, for a query with no attended
    key), else ``None``. ``epilogue`` gives ``out * r[q_block] + o[q_block]``. Differentiable in q, k, v (and
    through the LSE). ``tile=(BLOCK_M, BLOCK_N)`` overrides the kernel sub-tiles (powers of two >= 16 dividing
    the pattern's block sizes) of all three kernels (4 warps, 2 stages); ``configs`` fixes a kernel's whole launch,
    ``{"fwd" | "dkdv" | "dq": KernelConfig(block_m, block_n, warps, stages)}`` (validation runs use it to launch
    every config). By default configs are autotuned on CUDA and tiles equal the blocks when interpreting.
    """
    _check_inputs(q, k, v, pattern)
    fixed = _resolve_configs(tile, configs, pattern.block_q, pattern.block_kv)
    pattern = pattern.to(q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not scale > 0:
        raise ValueError(f"the triton backend needs a positive softmax scale, got {scale}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if epilogue is not None and (epilogue.scale.requires_grad or epilogue.bias.requires_grad):
            raise ValueError("the triton backend does not differentiate the epilogue's scale/bias; detach them")
        out, lse = _TritonSparseAttention.apply(q, k, v, pattern, scale, epilogue, fixed)
        return out, (lse if return_lse else None)
    return _forward(q, k, v, pattern, scale, return_lse, epilogue, fixed)
