"""Attention processors: the shared base and one class per method."""
from .base import DenseProcessor, FullProcessor, ProcessorStats, SparseAttentionProcessor

__all__ = ["DenseProcessor", "FullProcessor", "ProcessorStats", "SparseAttentionProcessor"]
