"""LTX-Video adapter: reproduces ``LTXVideoAttnProcessor`` with the self-attention op made sparse.

Replaced: ``transformer_blocks.N.attn1`` (video-only self-attention, raster t-h-w tokens, no text). ``attn2``
(text cross-attention) stays stock; with a shared instance its calls (``encoder_hidden_states`` given) take the
stock path. RoPE is applied to q/k before the head split, as the stock processor does.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..layout import TokenLayout
from ..token_order import SplitPoints
from .base import ModelAdapter
from .rope import first_change, rope_table_fits

__all__ = ["LTXAdapter", "ltx_rope_layout"]

_GRID_ARGS = {"num_frames": 4, "height": 5, "width": 6}


def ltx_rope_layout(rotary_emb: Any, seq_len: int) -> Optional[TokenLayout]:
    """Read ``(T, H, W)`` back from LTX's rotary table ``(cos, sin)``, each ``(B, S, D)`` over the full inner dim.

    After ``D % 6`` constant padding columns, the columns cycle t, t, h, h, w, w (one frequency per axis, each
    repeated twice). ``H*W`` is the first row whose t columns differ from row 0 and ``W`` the first row whose h
    columns differ; cos and sin are both compared (LTX's positions ``2g - 1`` make cos alone symmetric).
    """
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return None
    cos, sin = rotary_emb
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1] != seq_len or seq_len < 1:
        return None
    pad = cos.shape[-1] % 6
    table = torch.stack([cos[0, :, pad::2], sin[0, :, pad::2]], -1)  # (S, 3 * freqs, 2): axes cycle t, h, w
    t_cols = table[:, 0::3].flatten(1)
    h_cols = table[:, 1::3].flatten(1)
    hw = first_change(t_cols, seq_len)
    w = first_change(h_cols[:hw], hw)
    if hw % w or seq_len % hw:
        return None
    grid = (seq_len // hw, hw // w, w)
    if not rope_table_fits(table.flatten(1), grid):
        return None
    return TokenLayout(*grid)


class LTXAdapter(ModelAdapter):
    cross_attention_path = ("transformer_blocks", "attn2")
    split_points = SplitPoints(rope="rope", rope_dim=1, token_kwargs=("timestep",),
                               first_block="transformer_blocks.0", output="proj_out")
    name = "ltx"
    title = "LTX-Video"
    pipeline_class = "LTXPipeline"
    timestep_position = 2
    transformer_classes = ("LTXVideoTransformer3DModel",)
    attention_classes = ("LTXAttention",)

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        """``num_frames, height, width`` forward arguments (latent sizes) divided by the config's patch sizes."""
        sizes = [kwargs.get(name, args[pos] if len(args) > pos else None) for name, pos in _GRID_ARGS.items()]
        if any(s is None for s in sizes):
            return None
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return int(sizes[0]) // p_t, int(sizes[1]) // p, int(sizes[2]) // p

    def _stock(self, processor):
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        return self.stock_processor(LTXVideoAttnProcessor, processor)

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self._stock(processor)(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb)
            key = apply_rotary_emb(key, rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        dense = self.dispatcher_dense(processor, attention_mask)

        layout = None
        if attention_mask is None:
            layout = self.context_layout(processor) or processor.cached_rope_layout(
                rotary_emb, seq_len, ltx_rope_layout)
        out = processor.attend(query, key, value, layout, dense)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
