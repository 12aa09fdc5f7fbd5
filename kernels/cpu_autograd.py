"""Differentiable block-sparse attention on the CPU, call by call with ATen's fused flash kernels.

Forward: the inference path (``torch_backend``: dense rectangles of the pattern, merged by log-sum-exp), which also
gives the global output ``O`` and log-sum-exp ``L`` of every query row; both are saved. Backward: the same
rectangles again, each through ``_scaled_dot_product_flash_attention_for_cpu_backward`` fed the *global* ``O`` and
``L`` rows. For a rectangle of queries ``I`` and keys ``J`` the kernel computes

    P = exp(S_IJ - L_I),   dV_J += P^T dO_I,   dS = P * (dO_I V_J^T - rowsum(dO_I * O_I)),
    dQ_I += dS K_J * scale,   dK_J += dS^T Q_I * scale

which are exactly that rectangle's terms of the full gradient (``P`` is the true attention probability because
``L`` is the whole row's log-sum-exp, and ``rowsum(dO * O)`` is the whole row's), so summing them over the
rectangles gives the gradient of the sparse attention with no gathered keys and no materialised score matrix.
Partial blocks and keys past a sample's length get the same additive masks as in the forward.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .pattern import BlockPattern

__all__ = ["CPU_GRAD_DTYPES", "rect_sparse_attention", "usable"]

CPU_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

Rect = tuple[slice, slice, int, int, int, int, bool]  # (batch, heads, q0, q1, k0, k1, needs the predicate)


def _python_rects(pattern: BlockPattern, b: int, h: int) -> list[Rect]:
    """Every call of the Python forward path (no extension): one per query chunk and key run."""
    from .torch_backend import _query_chunks

    return [(bs, hs, q0, q1, k0, k1, part) for bs, hs, q0, q1, runs in _query_chunks(pattern, b, h)
            for k0, k1, part in runs]


class _RectAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern,
                scale: float) -> torch.Tensor:
        from .cpu_ext import cpu_extension
        from .torch_backend import _ext_forward, _runs_forward

        forward = _ext_forward if cpu_extension() else _runs_forward
        out, lse = forward(q, k, v, pattern, scale, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale = pattern, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        from .cpu_ext import cpu_extension

        q, k, v, out, lse = ctx.saved_tensors
        # rows that attend to nothing: L = +inf makes every P of theirs 0 (-inf would give exp(-inf + inf) = nan)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        saved = (grad_out.to(q.dtype).contiguous(), q.detach(), k.detach(), v.detach(), out, lse)
        if cpu_extension():
            dq, dk, dv = _extension_backward(saved, ctx.pattern, ctx.scale)
        else:
            dq, dk, dv = _backward_rects(_python_rects(ctx.pattern, q.shape[0], q.shape[1]), saved,
                                         ctx.pattern, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _extension_backward(saved: tuple, pattern: BlockPattern, scale: float) -> list[torch.Tensor]:
    """The forward's program backwards: its rectangles and windowed calls in the extension (``runs_backward``, on
    the intra-op threads), its masked calls here."""
    from .torch_backend import _launch, _threaded_program

    grad_out, q, k, v, out, lse = saved
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    program = _threaded_program(pattern, q.shape[0], q.shape[1])  # the forward's program
    grads = _backward_calls(program.masked, (grad_out, q, k, v, out, lse), pattern, scale)
    _launch(torch.ops.vidattn_cpu.runs_backward, program, (grad_out, q, k, v, out, lse, *grads), scale)
    return grads


def _backward_calls(rects: list[Rect], saved: tuple, pattern: BlockPattern, scale: float) -> list[torch.Tensor]:
    """fp32 ``[dq, dk, dv]``: the sum of the rectangles' gradient terms (module docstring)."""
    from .torch_backend import _additive_mask, _run_mask

    grad_out, q, k, v, out, lse = saved
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v))
    with torch.no_grad():
        for bs, hs, q0, q1, k0, k1, part in rects:
            qi, kj, vj = q[bs, hs, q0:q1], k[bs, hs, k0:k1], v[bs, hs, k0:k1]
            mask = _run_mask(pattern, q0, q1, k0, k1, part, bs)
            gq, gk, gv = _BACKWARD(grad_out[bs, hs, q0:q1], qi, kj, vj, out[bs, hs, q0:q1], lse[bs, hs, q0:q1],
                                   0.0, False, attn_mask=_additive_mask(mask, qi, kj), scale=scale)
            dq[bs, hs, q0:q1] += gq
            dk[bs, hs, k0:k1] += gk
            dv[bs, hs, k0:k1] += gv
    return [dq, dk, dv]


def _backward_rects(rects: list[Rect], saved: tuple, pattern: BlockPattern, scale: float) -> list[torch.Tensor]:
    """Without the extension: the rectangles' gradient terms summed; with T > 1 intra-op threads and enough
    rectangles, T worker threads each run single-threaded kernel calls on a balanced share into their own buffers
    (the calls release the GIL; as in the forward, this beats a fork-join inside each of many small calls)."""
    from concurrent.futures import ThreadPoolExecutor

    from .torch_backend import _balanced_bins, _one_thread_per_call

    threads = torch.get_num_threads()
    if threads < 2 or len(rects) < 4 * threads:
        return _backward_calls(rects, saved, pattern, scale)
    bins = _balanced_bins(rects, threads, lambda r: (r[3] - r[2]) * (r[5] - r[4]))
    with _one_thread_per_call(), ThreadPoolExecutor(threads, thread_name_prefix="vidattn-bwd") as pool:
        parts = list(pool.map(lambda chunk: _backward_calls(chunk, saved, pattern, scale), bins))
    return [sum(p[i] for p in parts) for i in range(3)]


def rect_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern,
                          scale: float) -> torch.Tensor:
    """Differentiable block-sparse attention of CPU ``(B, H, S, D)`` tensors (dtypes ``CPU_GRAD_DTYPES``)."""
    return _RectAttention.apply(q, k, v, pattern, scale)


def usable(q: torch.Tensor, return_lse: bool) -> bool:
    """The rectangle path takes this call: CPU, a flash dtype, no differentiable log-sum-exp asked for."""
    return q.device.type == "cpu" and q.dtype in CPU_GRAD_DTYPES and not return_lse and q.numel() > 0
