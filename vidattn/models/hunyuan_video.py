"""HunyuanVideo adapter: reproduces ``HunyuanVideoAttnProcessor2_0`` with the attention op made sparse.

Replaced: ``transformer_blocks.N.attn`` (dual-stream, layers ``0..n-1``) then ``single_transformer_blocks.N.attn``
(single-stream, layers ``n..``). The token refiner's attention keeps its stock processor; if a shared instance
reaches it (``set_attn_processor(p)``), the call takes the stock ``AttnProcessor2_0`` path.

Token order: joint sequence ``[video | text]``, text **last**. The model's bool key mask ``(B, 1, 1, N)`` keeps
the video and a per-sample prefix of the text; it becomes ``TextSegment(L, "last", valid=...)``, i.e. per-sample
key lengths, which mask exactly the keys the stock mask drops. RoPE is applied to the video part only.

Context parallelism: diffusers 0.42 gives ``HunyuanVideoTransformer3DModel`` no ``_cp_plan``; :meth:`cp_plan` is
vidattn's (see its docstring and ``vidattn.parallel``). Under it each attention call sees this rank's
``[video chunk | text chunk]``: the layout is checked against the global lengths (local x N), the model's key mask
(built for the whole sequence) is cut to the rank's chunks, and dense calls under ring gather every rank's keys
and mask (``vidattn.parallel.joint_ring_dense``). Only vidattn's processors know this; the stock processor is not
meant to run under this plan.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from ..layout import TextSegment, TokenLayout
from ..parallel import cp_degree, joint_ring_dense, joint_shard_mask
from ..token_order import SplitPoints
from .base import ModelAdapter
from .rope import banded_rope_layout

__all__ = ["HunyuanVideoAdapter"]


def _valid_text(attention_mask: Optional[torch.Tensor], batch: int, video_len: int,
                text_len: int) -> tuple[bool, Optional[tuple[int, ...]]]:
    """``(usable, valid)``: the per-sample valid text counts when the mask is HunyuanVideo's prefix key mask."""
    if attention_mask is None:
        return True, None
    n = video_len + text_len
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1) \
            or attention_mask.shape[-1] != n or attention_mask.shape[0] not in (1, batch):
        return False, None
    m = attention_mask.reshape(-1, n)
    counts = m.sum(1)
    prefix = torch.arange(n, device=m.device)[None] < counts[:, None]
    if not bool((m == prefix).all()) or bool((counts < video_len).any()):
        return False, None
    valid = tuple(int(c) - video_len for c in counts.expand(batch).tolist())
    return True, (None if all(v == text_len for v in valid) else valid)


class HunyuanVideoAdapter(ModelAdapter):
    split_points = SplitPoints(rope="rope", rope_dim=0, first_block="transformer_blocks.0", output="proj_out")

    def supports_token_order(self, transformer: nn.Module) -> bool:
        # I2V "token_replace" conditioning slices the first frame's tokens by raster position inside the blocks.
        return getattr(transformer.config, "image_condition_type", None) != "token_replace"
    name = "hunyuan"
    title = "HunyuanVideo"
    pipeline_class = "HunyuanVideoPipeline"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    attention_classes = ("Attention",)

    def cp_plan(self, transformer: Optional[nn.Module] = None) -> dict:
        """vidattn's context-parallel plan for ``HunyuanVideoTransformer3DModel`` (passed to diffusers'
        ``enable_parallelism(cp_plan=...)``). As diffusers' plans for joint-attention models (Flux, QwenImage):
        the rotary tables (``rope``'s outputs) and both streams at the first dual-stream block are cut into N equal
        chunks, so each rank holds ``[video chunk | text chunk]`` (the text length must divide by N), and
        ``proj_out``'s output is gathered. The token refiner, the timestep and the key mask (built from the whole
        sequence before the split) stay whole. ValueError for I2V ``token_replace`` models (their blocks slice
        the first frame by raster position)."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        if transformer is not None and not self.supports_token_order(transformer):
            raise ValueError("HunyuanVideo I2V (image_condition_type='token_replace') cannot run under context "
                             "parallelism: its blocks slice the first frame's tokens by raster position")
        rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        stream = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
        return {"rope": {0: rope, 1: rope},
                "transformer_blocks.0": {"hidden_states": stream, "encoder_hidden_states": stream},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    def matches_module(self, module: nn.Module) -> bool:
        """Legacy ``Attention`` modules, except CogVideoX's (whose q/k norm is a LayerNorm)."""
        return super().matches_module(module) and not isinstance(getattr(module, "norm_q", None), nn.LayerNorm)

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
        single = [(f"single_transformer_blocks.{i}.attn", b.attn)
                  for i, b in enumerate(transformer.single_transformer_blocks)]
        return dual + single

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None or x.dim() != 5:
            return None
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return x.shape[2] // p_t, x.shape[3] // p, x.shape[4] // p

    @staticmethod
    def _stock(processor, attn: nn.Module, refiner: bool):
        if refiner:
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            return AttnProcessor2_0() if getattr(attn, "scale_qk", True) else AttnProcessor()
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return ModelAdapter.stock_processor(HunyuanVideoAttnProcessor2_0, processor)

    def call_layout(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[TokenLayout]:
        """Grid + the text, last: ``encoder_hidden_states``' length, and per sample the first
        ``encoder_attention_mask.sum()`` tokens valid (the prefix key mask the transformer builds from it)."""
        video = super().call_layout(transformer, args, kwargs)
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
        if video is None or text is None or mask is None:
            return None
        length = text.shape[1]
        valid = tuple(int(v) for v in mask.sum(1).tolist())
        return replace(video, text=TextSegment(length, "last", None if all(v == length for v in valid) else valid))

    def _dense(self, processor, attention_mask: Optional[torch.Tensor], video_len: int, text_len: int):
        """The stock dense op; under context parallelism with this rank's part of the key mask, and under ring
        over every rank's keys (:func:`vidattn.parallel.joint_ring_dense`)."""
        config = processor._parallel_config
        cfg = getattr(config, "context_parallel_config", None)
        if cfg is None:
            return self.dispatcher_dense(processor, attention_mask)
        mask = joint_shard_mask(attention_mask, config, video_len, text_len)
        if cfg.ring_degree == 1:
            return self.dispatcher_dense(processor, mask)

        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
            return joint_ring_dense(q, k, v, mask, config, processor._attention_backend, scale)
        return dense

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> Any:
        if encoder_hidden_states is None:
            refiner = getattr(attn, "add_q_proj", None) is None and getattr(attn, "norm_q", None) is None
            stock = self._stock(processor, attn, refiner)
            if refiner:
                return stock(attn, hidden_states, None, attention_mask)
            return stock(attn, hidden_states, None, attention_mask, rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        video_len = hidden_states.shape[1]
        text_len = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states

        query, key, value = self.head_projections(attn, x)

        if rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)

        if not single:
            enc_query, enc_key, enc_value = self.head_projections(attn, encoder_hidden_states, added=True)
            query = torch.cat([query, enc_query], dim=1)
            key = torch.cat([key, enc_key], dim=1)
            value = torch.cat([value, enc_value], dim=1)

        shards = cp_degree(processor._parallel_config)  # 1, or N: this rank holds [video chunk | text chunk]
        dense = self._dense(processor, attention_mask, video_len, text_len)

        layout = self.context_layout(processor)
        if layout is not None and (layout.video_tokens, layout.text_tokens) != (video_len * shards,
                                                                                text_len * shards):
            layout = None  # e.g. image tokens joined to the text: read the grid back instead
        if layout is None and processor.uses_pattern and shards == 1:  # (a local shard's rope is no global grid)
            usable, valid = _valid_text(attention_mask, query.shape[0], video_len, text_len)
            video = processor.cached_rope_layout(rotary_emb, video_len, banded_rope_layout) if usable else None
            if video is not None:
                layout = replace(video, text=TextSegment(text_len, "last", valid))
        out = processor.attend(query, key, value, layout, dense)
        out = out.flatten(2, 3).to(query.dtype)

        out, enc_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out
