"""The pipeline-level install API shared by vidattn's pipeline subclasses."""
from __future__ import annotations

from typing import Optional

import vidattn
from vidattn.api import Installation
from vidattn.processors import SparseAttentionProcessor

__all__ = ["SparseAttentionPipelineMixin"]


class SparseAttentionPipelineMixin:
    """Adds ``set_attn_processor`` / ``reset_attn_processor`` / ``attention_stats`` to a diffusers pipeline."""

    def set_attn_processor(self, processor: SparseAttentionProcessor) -> Installation:
        """Install a vidattn processor on every self-attention layer (same as ``vidattn.apply(self, processor)``)."""
        return vidattn.apply(self, processor)

    def reset_attn_processor(self) -> None:
        """Restore the stock processors (same as ``vidattn.remove(self)``)."""
        vidattn.remove(self)

    @property
    def attention_stats(self) -> Optional[dict]:
        """Counters of the installed processor (sparse/dense calls, density, time), or None."""
        inst = vidattn.installed(self)
        return None if inst is None else inst.stats.summary()
