"""Mochi 1 adapter: reproduces ``MochiAttnProcessor2_0`` with the attention op made sparse.

Replaced: ``transformer_blocks.N.attn1`` (``MochiAttention``: no ``set_processor``, and the model has no
``set_attn_processor``, so ``.processor`` is assigned directly and restored by :func:`vidattn.remove`). As in the
stock processor, attention runs per sample on ``[video | that sample's valid text]`` (text **last**, no padding
inside the attention), with ``TextSegment(valid_i, "last")``; the output is padded back to the full length.
Dense attention is the stock direct ``F.scaled_dot_product_attention`` call on the same BHSD tensors (bit-exact).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import TextSegment, TokenLayout
from .base import ModelAdapter

__all__ = ["MochiAdapter", "mochi_rope_layout"]

_MAX_COLUMNS = 16


def _apply_mochi_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding on interleaved pairs, in fp32, with the stock processor's operations and order."""
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def mochi_rope_layout(rotary_emb: Any, seq_len: int, tol: float = 1e-3) -> Optional[TokenLayout]:
    """Read ``(T, H, W)`` back from Mochi's rotary table ``(cos, sin)``, each ``(S, heads, D/2)``.

    Mochi mixes the three axes in every column (learned ``pos_frequencies``), so the grid is read from the phase
    steps ``z[r+1] / z[r]`` between consecutive tokens: a constant x step inside a row, another step at each row
    wrap (every ``W`` tokens) and a third at each frame wrap (every ``H*W``). Spatial positions are centred, so
    ``z[0] * z[S-1] = 1`` iff ``T = 1``. Returns ``None`` where the table cannot tell the grid (``H = 1`` or
    ``W = 1`` with ``T > 1``, a single row, or an untrained all-zero table) or does not have this structure.
    """
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return None
    cos, sin = rotary_emb
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[0] != seq_len or seq_len < 1:
        return None
    s = seq_len
    if s == 1:
        return TokenLayout(1, 1, 1)
    stride = -(-cos[0].numel() // _MAX_COLUMNS)
    z = torch.complex(cos.flatten(1)[:, ::stride].double(), sin.flatten(1)[:, ::stride].double())
    steps = z[1:] * z[:-1].conj()

    def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(a - b).abs().amax((-2, -1)) <= tol

    single_frame = bool(same(z[0] * z[-1], torch.ones_like(z[0])))
    differs = ~same(steps, steps[0])
    if not bool(differs.any()):
        return None if single_frame else TokenLayout(s, 1, 1)
    w = int(differs.nonzero()[0]) + 1
    third = differs & ~same(steps, steps[w - 1])
    if bool(third.any()):
        hw = int(third.nonzero()[0]) + 1
    elif single_frame:
        hw = s
    else:
        return None
    if hw % w or s % hw or single_frame != (hw == s):
        return None
    index = torch.arange(1, s, device=steps.device)
    frame_wrap = index % hw == 0
    row_wrap = (index % w == 0) & ~frame_wrap
    for kind in (~(frame_wrap | row_wrap), row_wrap, frame_wrap):
        group = steps[kind]
        if group.numel() and not bool(same(group, group[0]).all()):
            return None
    return TokenLayout(s // hw, hw // w, w)


class MochiAdapter(ModelAdapter):
    name = "mochi"
    title = "Mochi"
    pipeline_class = "MochiPipeline"
    rope_caveats = {
        "unreadable": "an untrained Mochi's pos_frequencies are zero or near zero, so its rotary embedding is the "
                      "identity and carries no grid; a grid one token high or wide cannot be read either",
    }
    timestep_position = 2
    transformer_classes = ("MochiTransformer3DModel",)
    attends_call_layout = False  # per sample: video + that sample's valid text
    attention_classes = ("MochiAttention",)

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None or x.dim() != 5:
            return None
        p = transformer.config.patch_size
        return x.shape[2], x.shape[3] // p, x.shape[4] // p

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = self.head_projections(attn, hidden_states)

        enc_query, enc_key, enc_value = self.head_projections(attn, encoder_hidden_states, added=True)

        if rotary_emb is not None:
            query = _apply_mochi_rotary(query, *rotary_emb)
            key = _apply_mochi_rotary(key, *rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        enc_query, enc_key, enc_value = enc_query.transpose(1, 2), enc_key.transpose(1, 2), enc_value.transpose(1, 2)
        video_len, text_len = query.size(2), enc_query.size(2)
        total = video_len + text_len

        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 dropout_p=0.0, is_causal=False, scale=scale)
            return out.transpose(1, 2)

        video = self.context_layout(processor) or processor.cached_rope_layout(
            rotary_emb, video_len, mochi_rope_layout)
        outs = []
        for idx in range(query.shape[0]):
            if attention_mask is None:
                valid = torch.arange(text_len, device=query.device)
            else:
                valid = torch.nonzero(attention_mask[idx][None, :].flatten(), as_tuple=False).flatten()
            q = torch.cat([query[idx:idx + 1], enc_query[idx:idx + 1, :, valid, :]], dim=2)
            k = torch.cat([key[idx:idx + 1], enc_key[idx:idx + 1, :, valid, :]], dim=2)
            v = torch.cat([value[idx:idx + 1], enc_value[idx:idx + 1, :, valid, :]], dim=2)
            layout = None if video is None else TokenLayout(
                video.frames, video.height, video.width, text=TextSegment(int(valid.numel()), "last"))
            out = processor.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, dense)
            out = out.transpose(1, 2)
            outs.append(F.pad(out, (0, 0, 0, total - out.size(2))))

        out = torch.cat(outs, dim=0).transpose(1, 2).flatten(2, 3)
        out, encoder_out = out.split_with_sizes((video_len, text_len), dim=1)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out
