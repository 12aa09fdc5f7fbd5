"""Drop-in subclasses of diffusers' Wan pipelines with ``set_attn_processor`` (equivalent to ``vidattn.apply``)."""
from __future__ import annotations

from diffusers import WanPipeline as _StockWanPipeline

from .mixin import SparseAttentionPipelineMixin

__all__ = ["WanPipeline"]


class WanPipeline(SparseAttentionPipelineMixin, _StockWanPipeline):
    """``diffusers.WanPipeline`` plus ``set_attn_processor(processor)`` / ``reset_attn_processor()``.

    Loads with ``WanPipeline.from_pretrained(...)`` exactly like the stock class (Wan 2.1 and 2.2, whose
    ``transformer_2`` is covered too).
    """
