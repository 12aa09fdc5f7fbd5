"""Pipelines: drop-in diffusers subclasses, tiny offline pipelines, video I/O, generation.

``vidattn.pipelines.WanPipeline`` (and the HunyuanVideo, CogVideoX, LTX and Mochi ones) load lazily; import the
submodules (``vidattn.pipelines.tiny``, ``.video_io``, ``.generate``) directly.
"""
from __future__ import annotations

import importlib

__all__ = ["CogVideoXPipeline", "HunyuanVideoPipeline", "LTXPipeline", "MochiPipeline", "WanPipeline"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".dropin", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
