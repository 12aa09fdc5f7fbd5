"""vidattn: sparse attention for video diffusion transformers in diffusers."""
from .kernels import BlockPattern, Epilogue, WindowPredicate, sparse_attention
from .layout import TextSegment, TokenLayout

__version__ = "0.1.0"

__all__ = [
    "BlockPattern",
    "Epilogue",
    "TextSegment",
    "TokenLayout",
    "WindowPredicate",
    "sparse_attention",
]
