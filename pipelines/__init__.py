"""Pipelines: drop-in diffusers subclasses, tiny offline pipelines, video I/O, generation.

``vidattn.pipelines.WanPipeline`` (and the HunyuanVideo, CogVideoX, LTX and Mochi ones, and the FreeSwim
high-resolution pipelines ``FreeSwimPipeline`` (Wan) and ``FreeSwimLTXPipeline``) load lazily; import the
submodules (``vidattn.pipelines.tiny``, ``.video_io``, ``.generate``) directly.
"""
from __future__ import annotations

import importlib

__all__ = ["CogVideoXPipeline", "FreeSwimLTXPipeline", "FreeSwimPipeline", "HunyuanVideoPipeline", "LTXPipeline",
           "MochiPipeline", "WanPipeline"]
_MODULES = {"FreeSwimPipeline": ".freeswim", "FreeSwimLTXPipeline": ".freeswim_ltx"}


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(_MODULES.get(name, ".dropin"), __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
