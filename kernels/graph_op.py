"""``sparse_attention`` inside ``torch.compile`` graphs: the whole call as one opaque custom op.

A block pattern is host-side data (CSR lists, per-backend call plans built on first use, a token predicate): its
contents cannot be traced, and specialising a graph on them would recompile per pattern. Under compilation
:func:`vidattn.kernels.sparse_attention` therefore calls ``torch.ops.vidattn.sparse_attention`` with the
pattern's :class:`PatternHandle`, a reference-type opaque object (torch's opaque-object mechanism): the graph
takes it as an input, so another pattern of the same shapes reuses the compiled graph, and inside the op the eager
kernels run exactly as they do outside. A handle is made with its pattern, so patterns must be built outside the
compiled region (vidattn builds them in the transformer's forward pre-hook). Inference only: the op has no
autograd formula, so a compiled training step raises (train eagerly, or compile with dense attention).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

__all__ = ["PatternHandle", "GRAPH_OP_AVAILABLE", "graph_sparse_attention", "register_eager"]

try:  # torch >= 2.10
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # pragma: no cover - older torch: compiled graphs break at sparse_attention instead
    OpaqueBase, register_opaque_type = object, None


class PatternHandle(OpaqueBase):
    """A weak reference to one :class:`BlockPattern`, passed through compiled graphs as an opaque input."""

    def __init__(self, pattern) -> None:
        self._pattern = weakref.ref(pattern)

    def pattern(self):
        pattern = self._pattern()
        if pattern is None:
            raise RuntimeError("vidattn: the block pattern of a compiled sparse_attention call was freed")
        return pattern


GRAPH_OP_AVAILABLE = register_opaque_type is not None
_EAGER: list[Callable] = []  # the eager sparse_attention, registered by dispatch (no import cycle)


def register_eager(fn: Callable) -> None:
    _EAGER[:] = [fn]


if GRAPH_OP_AVAILABLE:
    register_opaque_type(PatternHandle, typ="reference")

    @torch.library.custom_op("vidattn::sparse_attention", mutates_args=())
    def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: PatternHandle,
                             scale: Optional[float], return_lse: bool, backend: str, layout: str,
                             epilogue_scale: Optional[torch.Tensor],
                             epilogue_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from .epilogue import Epilogue

        epilogue = None if epilogue_scale is None else Epilogue(epilogue_scale, epilogue_bias)
        result = _EAGER[0](q, k, v, handle.pattern(), scale=scale, return_lse=return_lse, backend=backend,
                           layout=layout, epilogue=epilogue)
        out, lse = result if return_lse else (result, q.new_empty(0, dtype=torch.float32))
        return out.contiguous(), lse.contiguous()

    @_sparse_attention_op.register_fake
    def _(q, k, v, handle, scale, return_lse, backend, layout, epilogue_scale, epilogue_bias):
        heads_dim, seq_dim = (1, 2) if layout == "bhsd" else (2, 1)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse_shape = (q.shape[0], q.shape[heads_dim], q.shape[seq_dim]) if return_lse else (0,)
        return out, q.new_empty(lse_shape, dtype=torch.float32)


def graph_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: Optional[float],
                           return_lse: bool, backend: str, layout: str, epilogue):
    """:func:`sparse_attention` as one traced op (called by it while ``torch.compiler.is_compiling()``)."""
    if not GRAPH_OP_AVAILABLE:  # pragma: no cover
        raise RuntimeError("vidattn: compiling sparse attention needs torch >= 2.10 (opaque custom-op arguments)")
    out, lse = torch.ops.vidattn.sparse_attention(
        q, k, v, pattern.graph_handle, scale, return_lse, backend, layout,
        None if epilogue is None else epilogue.scale, None if epilogue is None else epilogue.bias)
    return (out, lse) if return_lse else out
