"""``sparse_attention``: one entry point over interchangeable block-sparse backends."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from .epilogue import Epilogue
from .graph_op import graph_sparse_attention, register_eager
from .pattern import BlockPattern

__all__ = ["sparse_attention", "available_backends", "choose_backend", "BACKENDS"]

logger = logging.getLogger("vidattn.kernels")

BACKENDS = ("auto", "reference", "torch", "flex", "triton")
_LAYOUTS = ("bhsd", "bshd")


def _load(name: str) -> Callable:
    if name == "reference":
        from .reference import reference_attention
        return reference_attention
    if name == "torch":
        from .torch_backend import torch_sparse_attention
        return torch_sparse_attention
    if name == "flex":
        from .flex_backend import flex_sparse_attention
        return flex_sparse_attention
    if name == "triton":
        from .triton_attention import triton_sparse_attention
        return triton_sparse_attention
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment (``reference`` is always there)."""
    device = torch.device(device)
    names = ["reference", "torch"]
    if hasattr(torch.nn.attention, "flex_attention") or _has_flex():
        names.append("flex")
    if _triton_usable(device):
        names.append("triton")
    return names


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_fits(pattern: BlockPattern, head_dim: int, dtype: torch.dtype) -> bool:
    from .triton_attention import MAX_HEAD_DIM, SUPPORTED_BLOCKS, kernel_window

    return (pattern.block_q in SUPPORTED_BLOCKS and pattern.block_kv in SUPPORTED_BLOCKS and head_dim <= MAX_HEAD_DIM
            and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (pattern.partial is None or kernel_window(pattern.predicate) is not None))


_LOGGED: set = set()


def choose_backend(device: torch.device, pattern: BlockPattern, head_dim: int,
                   dtype: torch.dtype = torch.bfloat16) -> str:
    """``auto``: Triton on CUDA when it takes the pattern (block sizes, predicate type, head dim), else
    FlexAttention; on CPU the torch backend (contiguous kv runs through the CPU flash kernel), which measured faster
    than compiled FlexAttention at every density and also has a backward."""
    if device.type == "cuda" and _triton_usable(device):
        if _triton_fits(pattern, head_dim, dtype):
            return "triton"
        key = (pattern.block_q, pattern.block_kv, type(pattern.predicate).__name__, head_dim, dtype)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info("vidattn: the triton backend does not take blocks %sx%s / predicate %s / head_dim %s / %s; "
                        "using %s", *key, "flex" if _has_flex() else "torch")
    if device.type == "cuda" and _has_flex():
        return "flex"
    return "torch"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    layout: str = "bhsd",
    epilogue: Optional[Epilogue] = None,
):
    """Block-sparse attention ``softmax(q k^T * scale + mask) v`` over the pattern's blocks.

    ``q, k, v``: ``(B, H, S, D)`` (``layout="bhsd"``) or ``(B, S, H, D)`` (``layout="bshd"``, diffusers' layout;
    handled as strided views, no copy). ``scale`` defaults to ``D ** -0.5``. Returns the output in the input layout,
    and with ``return_lse`` also the natural-log log-sum-exp ``(B, H, S_q)`` in fp32 (``-inf`` for a query that
    attends to nothing; its output is 0). ``epilogue`` applies ``out * scale[q_block] + bias[q_block]``.

    Inside ``torch.compile`` the call is one opaque op (``kernels/graph_op.py``): build the pattern outside the
    compiled region; the op runs this function eagerly.
    """
    if torch.compiler.is_compiling():
        return graph_sparse_attention(q, k, v, pattern, scale=scale, return_lse=return_lse, backend=backend,
                                      layout=layout, epilogue=epilogue)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D ({layout.upper()}), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    pattern.check_inputs(q, k, v)
    d = q.shape[-1]
    pattern = pattern.to(q.device)
    name = choose_backend(q.device, pattern, d, q.dtype) if backend == "auto" else backend
    fn = _load(name)
    if name == "triton":
        out, lse = fn(q, k, v, pattern, scale=scale, return_lse=return_lse, epilogue=epilogue)
    else:
        out, lse = fn(q, k, v, pattern, scale=scale, return_lse=return_lse)
        if epilogue is not None:
            out = epilogue.apply(out, pattern.block_q)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


register_eager(sparse_attention)
