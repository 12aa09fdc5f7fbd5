"""Attention processors: the shared base and one class per method."""
from .base import DenseProcessor, FullProcessor, ProcessorStats, SparseAttentionProcessor
from .freeswim import FREESWIM_PRESETS, FreeSwimProcessor
from .radial import RADIAL_PRESETS, RadialProcessor
from .rectified import RECTIFIED_PRESETS, RectifiedProcessor

__all__ = ["DenseProcessor", "FREESWIM_PRESETS", "FreeSwimProcessor", "FullProcessor", "ProcessorStats", "RADIAL_PRESETS", "RECTIFIED_PRESETS",
           "RadialProcessor", "RectifiedProcessor", "SparseAttentionProcessor"]
