"""Drop-in subclasses of diffusers' video pipelines with ``set_attn_processor`` (equivalent to ``vidattn.apply``).

Each loads with ``from_pretrained`` exactly like the stock class and behaves identically until a processor is set.
"""
from __future__ import annotations

from diffusers import CogVideoXPipeline as _CogVideoXPipeline
from diffusers import HunyuanVideoPipeline as _HunyuanVideoPipeline
from diffusers import LTXPipeline as _LTXPipeline
from diffusers import MochiPipeline as _MochiPipeline
from diffusers import WanPipeline as _WanPipeline

from .mixin import SparseAttentionPipelineMixin

__all__ = ["CogVideoXPipeline", "HunyuanVideoPipeline", "LTXPipeline", "MochiPipeline", "WanPipeline"]


class WanPipeline(SparseAttentionPipelineMixin, _WanPipeline):
    """``diffusers.WanPipeline`` (Wan 2.1 and 2.2; ``transformer_2`` is covered too) + ``set_attn_processor``."""


class HunyuanVideoPipeline(SparseAttentionPipelineMixin, _HunyuanVideoPipeline):
    """``diffusers.HunyuanVideoPipeline`` + ``set_attn_processor``."""


class CogVideoXPipeline(SparseAttentionPipelineMixin, _CogVideoXPipeline):
    """``diffusers.CogVideoXPipeline`` + ``set_attn_processor``."""


class LTXPipeline(SparseAttentionPipelineMixin, _LTXPipeline):
    """``diffusers.LTXPipeline`` + ``set_attn_processor``."""


class MochiPipeline(SparseAttentionPipelineMixin, _MochiPipeline):
    """``diffusers.MochiPipeline`` + ``set_attn_processor`` (Mochi's transformer has none of its own)."""
