"""Attention processors: the shared base and one class per method."""
from .base import DenseProcessor, FullProcessor, ProcessorStats, SparseAttentionProcessor
from .radial import RADIAL_PRESETS, RadialProcessor
from .rectified import RECTIFIED_PRESETS, RectifiedProcessor

__all__ = ["DenseProcessor", "FullProcessor", "ProcessorStats", "RADIAL_PRESETS", "RECTIFIED_PRESETS",
           "RadialProcessor", "RectifiedProcessor", "SparseAttentionProcessor"]
