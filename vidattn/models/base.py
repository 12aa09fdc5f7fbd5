"""ModelAdapter: what vidattn must know about one transformer family."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..layout import TokenLayout

__all__ = ["ModelAdapter"]


class ModelAdapter:
    """One transformer family (Wan, HunyuanVideo, ...). Subclasses set the class names and implement the hooks.

    * ``self_attention_modules`` — the modules to replace, in layer order;
    * ``grid`` — the latent token grid ``(T, H, W)`` after patching, from the transformer's forward inputs;
    * ``layout`` — the call's :class:`TokenLayout` from that grid and the call (text tokens, masks), or read back
      from the rotary embedding when no step context exists;
    * ``process`` — the stock processor's computation with the attention op replaced by ``processor.attend``.
    """

    name: str = ""
    timestep_position: int = 1
    transformer_classes: tuple[str, ...] = ()
    attention_classes: tuple[str, ...] = ()

    def matches_transformer(self, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in self.transformer_classes

    def matches_module(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.attention_classes

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def get_processor(self, module: nn.Module) -> Any:
        return module.get_processor() if hasattr(module, "get_processor") else module.processor

    def set_processor(self, module: nn.Module, processor: Any) -> None:
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The ``timestep`` forward argument (keyword, or positional at ``timestep_position``)."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[self.timestep_position] if len(args) > self.timestep_position else None

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> Any:
        raise NotImplementedError

    def context_layout(self, processor) -> Optional[TokenLayout]:
        """The video layout from the processor's step context, if it has one."""
        ctx = processor.context
        if ctx is None or ctx.grid is None:
            return None
        return TokenLayout(*ctx.grid)
