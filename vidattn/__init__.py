"""vidattn: sparse attention for video diffusion transformers in diffusers."""
from .api import Installation, apply, installed, remove
from .context import StepContext
from .kernels import BlockPattern, Epilogue, WindowPredicate, sparse_attention
from .layout import TextSegment, TokenLayout
from .patterns import radial_pattern, radial_stats
from .processors import DenseProcessor, FullProcessor, ProcessorStats, RadialProcessor, SparseAttentionProcessor

__version__ = "0.1.0"

__all__ = [
    "BlockPattern",
    "DenseProcessor",
    "Epilogue",
    "FullProcessor",
    "Installation",
    "ProcessorStats",
    "RadialProcessor",
    "SparseAttentionProcessor",
    "StepContext",
    "TextSegment",
    "TokenLayout",
    "WindowPredicate",
    "apply",
    "installed",
    "radial_pattern",
    "radial_stats",
    "remove",
    "sparse_attention",
]
