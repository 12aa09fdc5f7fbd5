"""Block-sparse attention kernels and their input format (imports only torch and, lazily, triton)."""
from .dispatch import BACKENDS, available_backends, choose_backend, sparse_attention
from .epilogue import Epilogue
from .pattern import BlockPattern
from .predicates import PermutedPredicate, TemporalWindowPredicate, WindowPredicate, window_starts

__all__ = [
    "BACKENDS",
    "BlockPattern",
    "Epilogue",
    "PermutedPredicate",
    "TemporalWindowPredicate",
    "WindowPredicate",
    "available_backends",
    "choose_backend",
    "sparse_attention",
    "window_starts",
]
