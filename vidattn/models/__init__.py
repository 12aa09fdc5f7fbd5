"""Model adapters: one module per transformer family; adding a model means adding one adapter."""
from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .mochi import MochiAdapter
from .wan import WanAdapter

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for_module", "adapter_for_transformer", "register_adapter"]

ADAPTERS: list[ModelAdapter] = [WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), LTXAdapter(), MochiAdapter()]


def register_adapter(adapter: ModelAdapter) -> None:
    """Add an adapter (later registrations win for the classes they name)."""
    ADAPTERS.insert(0, adapter)


def adapter_for_transformer(transformer: nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches_transformer(transformer):
            return adapter
    names = sorted({c for a in ADAPTERS for c in a.transformer_classes})
    raise TypeError(f"vidattn has no adapter for {type(transformer).__name__}; supported transformers: {names}")


def adapter_for_module(module: nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches_module(module):
            return adapter
    names = sorted({c for a in ADAPTERS for c in a.attention_classes})
    raise TypeError(f"vidattn processors cannot run on {type(module).__name__}; supported attention modules: {names}")
