"""vidattn: sparse attention for video diffusion transformers in diffusers."""
from .api import Installation, apply, installed, remove
from .context import StepContext
from .kernels import BlockPattern, Epilogue, WindowPredicate, sparse_attention
from .layout import TextSegment, TokenLayout
from .gilbert import block_neighbours, gilbert_inverse, gilbert_order
from .patterns import radial_pattern, radial_stats, rectified_attention, rectified_selection, window_pattern
from .plan import AttentionPlan, PlanPart
from .processors import (
    DenseProcessor,
    FreeSwimProcessor,
    FullProcessor,
    ProcessorStats,
    RadialProcessor,
    RectifiedProcessor,
    SparseAttentionProcessor,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan",
    "BlockPattern",
    "DenseProcessor",
    "Epilogue",
    "FreeSwimProcessor",
    "FullProcessor",
    "Installation",
    "PlanPart",
    "ProcessorStats",
    "RadialProcessor",
    "RectifiedProcessor",
    "SparseAttentionProcessor",
    "StepContext",
    "TextSegment",
    "TokenLayout",
    "WindowPredicate",
    "apply",
    "block_neighbours",
    "gilbert_inverse",
    "gilbert_order",
    "installed",
    "radial_pattern",
    "radial_stats",
    "rectified_attention",
    "rectified_selection",
    "remove",
    "sparse_attention",
    "window_pattern",
]
