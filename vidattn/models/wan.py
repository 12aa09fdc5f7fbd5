"""Wan 2.1 / 2.2 adapter: ``blocks.N.attn1`` is replaced; ``attn2`` (text / image cross-attention) stays stock."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..layout import TokenLayout
from ..token_order import SplitPoints
from .base import ModelAdapter
from .rope import first_change

__all__ = ["WanAdapter", "wan_rope_layout", "apply_wan_rotary"]


def _qkv(attn: nn.Module, hidden_states: torch.Tensor):
    """q, k, v projections as diffusers computes them (fused projections and LoRA-wrapped Linears included)."""
    try:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections
    except ImportError:  # pragma: no cover - older diffusers
        if getattr(attn, "fused_projections", False):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    return _get_qkv_projections(attn, hidden_states, None)


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs ``(x1, x2)``: ``(x1 cos - x2 sin, x1 sin + x2 cos)``.

    The same operations in the same order as diffusers' ``WanAttnProcessor``, so dense mode is bit-exact.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_rope_layout(rotary_emb: Any, seq_len: int) -> Optional[TokenLayout]:
    """Read ``(T, H, W)`` back from Wan's rotary table ``(cos, sin)``, each ``(1, S, 1, D)``.

    The head dim splits into t | h | w sub-bands with ``h = w = 2*(D//6)``. The t sub-band is constant inside a
    frame and the h sub-band inside a row, so ``H*W`` is the first row whose t sub-band differs from row 0 and
    ``W`` the first row whose h sub-band differs.
    """
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return None
    cos = rotary_emb[0]
    if cos.dim() != 4 or cos.shape[1] != seq_len:
        return None
    d = cos.shape[-1]
    hd = 2 * (d // 6)
    td = d - 2 * hd
    rows = cos[0, :, 0]
    hw = first_change(rows[:, :td], seq_len)
    w = first_change(rows[:hw, td:td + hd], hw)
    if hw % w or seq_len % hw:
        return None
    return TokenLayout(seq_len // hw, hw // w, w)


class WanAdapter(ModelAdapter):
    name = "wan"
    title = "Wan"
    pipeline_class = "WanPipeline"
    transformer_classes = ("WanTransformer3DModel",)
    attention_classes = ("WanAttention",)
    self_attention_path = ("blocks", "attn1")
    cross_attention_path = ("blocks", "attn2")
    split_points = SplitPoints(rope="rope", rope_dim=1, token_kwargs=("timestep",), first_block="blocks.0",
                               output="proj_out")

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None or x.dim() != 5:
            return None
        p_t, p_h, p_w = transformer.config.patch_size
        return x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w

    def _stock(self, processor):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return self.stock_processor(WanAttnProcessor, processor)

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or getattr(attn, "is_cross_attention", False):
            return self._stock(processor)(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary(query, *rotary_emb)
            key = apply_wan_rotary(key, *rotary_emb)

        dense = self.dispatcher_dense(processor, attention_mask)

        layout = None
        if attention_mask is None:
            layout = self.context_layout(processor) or processor.cached_rope_layout(
                rotary_emb, query.shape[1], wan_rope_layout)
        out = processor.attend(query, key, value, layout, dense)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
