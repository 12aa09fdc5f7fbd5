"""Pipelines: drop-in diffusers subclasses, tiny offline pipelines, video I/O, batch generation.

Import submodules directly (``vidattn.pipelines.tiny``); the pipeline classes load lazily.
"""
from __future__ import annotations

import importlib

__all__ = ["WanPipeline"]

_LAZY = {"WanPipeline": "wan"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
