"""CogVideoX / CogVideoX 1.5 adapter: reproduces ``CogVideoXAttnProcessor2_0`` with the attention op made sparse.

Replaced: ``transformer_blocks.N.attn1``. Token order: joint sequence ``[text | video]``, text **first** (all text
tokens are valid: CogVideoX has no text mask), ``TextSegment(L, "first")``. q/k/v are BHSD as in the stock
processor, RoPE is applied in place to the video part, and dense attention is the stock direct
``F.scaled_dot_product_attention`` call (bit-exact); ``processor.attend`` gets BSHD views of the same tensors.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import TextSegment, TokenLayout
from ..token_order import SplitPoints
from .base import ModelAdapter
from .rope import banded_rope_layout

__all__ = ["CogVideoXAdapter"]


class CogVideoXAdapter(ModelAdapter):
    split_points = SplitPoints(rope_kwarg="image_rotary_emb", rope_dim=0, first_block="transformer_blocks.0",
                               output="proj_out")
    name = "cogvideox"
    title = "CogVideoX"
    pipeline_class = "CogVideoXPipeline"
    rope_caveats = {
        "missing": "CogVideoX models without rotary embeddings, such as CogVideoX-2b with "
                   "use_rotary_positional_embeddings=False, pass none",
        "unreadable": "at some resolutions CogVideoX's RoPE crop gives two rows or columns the same position",
    }
    timestep_position = 2
    transformer_classes = ("CogVideoXTransformer3DModel",)
    attention_classes = ("Attention",)

    def matches_module(self, module: nn.Module) -> bool:
        """Legacy ``Attention`` with a LayerNorm q/k norm (CogVideoX blocks always build it with ``qk_norm``)."""
        return super().matches_module(module) and isinstance(getattr(module, "norm_q", None), nn.LayerNorm)


    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None or x.dim() != 5:
            return None
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t or 1
        return x.shape[1] // p_t, x.shape[3] // p, x.shape[4] // p

    def call_layout(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[TokenLayout]:
        """Grid + the text, first: all of ``encoder_hidden_states`` (CogVideoX has no text mask)."""
        video = super().call_layout(transformer, args, kwargs)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if video is None or text is None:
            return None
        return replace(video, text=TextSegment(text.shape[1], "first"))

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> Any:
        if encoder_hidden_states is None:
            from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

            return CogVideoXAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = x.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(x)
        key = attn.to_k(x)
        value = attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary_emb)

        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale)
            return out.transpose(1, 2)

        layout = None
        if attention_mask is None:
            layout = self.context_layout(processor)
            if layout is None or (layout.seq_len, layout.text_tokens) != (seq_len, text_len):
                video = processor.cached_rope_layout(rotary_emb, seq_len - text_len, banded_rope_layout)
                layout = None if video is None else replace(video, text=TextSegment(text_len, "first"))
        out = processor.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, dense)
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out
