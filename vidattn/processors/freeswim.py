"""FreeSwim (spec ``freeswim.md``): inward sliding-window self-attention, full self-attention and the cross-attention
override with record/replay, as processors driven by the pipeline's :class:`~vidattn.context.PassContext`.

* Self-attention (:class:`FreeSwimProcessor`): in a ``"window"`` pass (and outside any FreeSwim pass) the exact
  inward window of the base grid (:func:`vidattn.patterns.window.window_pattern`) through the sparse kernels; in a
  ``"full"`` pass full attention through diffusers' dispatcher. Both with FreeSwim's logit scale when
  ``scale_ratio`` is set (spec §2.3): ``scale = sqrt(log(ratio * N_b) / log(N_b) / d)``, ``N_b`` =
  ``scale_base_tokens`` (default: base grid tokens per frame; 1560 for 480×832 on Wan).
* Cross-attention (:class:`FreeSwimCrossProcessor`): role from the pass — ``"own"`` (stock), ``"record"`` (stock,
  and the output after ``to_out`` stored per layer), ``"replay"`` (the stored output of that layer, the query
  unused: the window branch's cross-attention is replaced by the full branch's).

One :class:`FreeSwimState` per installation holds the per-layer cache (optionally on another device, e.g. the CPU
to save accelerator memory); no class-global state.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..layout import TokenLayout
from ..plan import AttentionPlan
from .base import SparseAttentionProcessor

__all__ = ["FREESWIM_PRESETS", "FreeSwimCrossProcessor", "FreeSwimProcessor", "FreeSwimState", "freeswim_scale"]

# Base grids in latent cells (16 px on Wan) and FreeSwim's scale; generation settings of the upstream script.
# 8x16 spatial tiles: measured faster than raster order for the window at 1080p and 4K (docs/benchmarks.md).
FREESWIM_PRESETS: dict[str, dict[str, Any]] = {
    "wan-1.3b": dict(base_rows=30, base_cols=52, scale_ratio=2.0, tiles=(8, 16),
                     generation=dict(height=1088, width=1920, num_frames=81, num_inference_steps=50,
                                     guidance_scale=5.0)),
    "wan-14b": dict(base_rows=45, base_cols=80, scale_ratio=2.0, tiles=(8, 16),
                    generation=dict(height=1440, width=2560, num_frames=81, num_inference_steps=50,
                                    guidance_scale=5.0)),
}


def freeswim_scale(head_dim: int, base_tokens: int, ratio: float) -> float:
    """FreeSwim's softmax scale ``sqrt(log(ratio * N_b) / log(N_b) / d)`` (spec §2.3; > 1/sqrt(d) for ratio > 1)."""
    if base_tokens < 2:
        raise ValueError(f"scale_base_tokens must be >= 2, got {base_tokens}")
    return math.sqrt(math.log(ratio * base_tokens) / math.log(base_tokens) / head_dim)


class FreeSwimState:
    """The cross-attention cache of one installation: ``cache[layer]`` = the recorded output of that layer."""

    def __init__(self, cache_device: Optional[str] = None) -> None:
        self.cache_device = cache_device
        self.cache: dict[int, torch.Tensor] = {}
        self.records = 0
        self.replays = 0

    def clear(self) -> None:
        self.cache.clear()

    def record(self, layer: int, output: torch.Tensor) -> None:
        device = self.cache_device or output.device
        self.cache[layer] = output.detach().to(device, non_blocking=True)
        self.records += 1

    def replay(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        if layer not in self.cache:
            raise RuntimeError(f"vidattn FreeSwim: cross-attention layer {layer} has no recorded output to replay; "
                               "run a pass with cross='record' first")
        out = self.cache[layer]
        if out.shape[0] != like.shape[0] or out.shape[1] != like.shape[1]:
            raise RuntimeError(f"vidattn FreeSwim: recorded cross-attention output of layer {layer} has shape "
                               f"{tuple(out.shape)}, this call needs batch {like.shape[0]} x {like.shape[1]} tokens")
        self.replays += 1
        return out.to(like.device, non_blocking=True)


class FreeSwimProcessor(SparseAttentionProcessor):
    """FreeSwim's self-attention: the inward window of a ``base_rows x base_cols`` latent grid (half sizes
    ``base_rows // 2``, ``base_cols // 2``) or, in a ``"full"`` pass, full attention; see the module docstring.

    ``temporal``: optional temporal half-window in latent frames (off: all frames, as upstream); ``inward=False``:
    the truncated ablation; ``tiles``: ``(rows, cols)`` spatial tiles as the token order (fewer partial blocks);
    ``cache_device``: where recorded cross-attention outputs live.
    """

    method = "freeswim"

    def __init__(self, base_rows: int, base_cols: int, *, inward: bool = True, temporal: Optional[int] = None,
                 scale_ratio: Optional[float] = None, scale_base_tokens: Optional[int] = None,
                 block_size: int = 128, tiles: Optional[tuple[int, int]] = None, cache_device: Optional[str] = None,
                 dense_steps: int = 0, dense_layers: int = 0, dense_last_steps: int = 0,
                 backend: str = "auto") -> None:
        super().__init__(dense_steps=dense_steps, dense_layers=dense_layers, dense_last_steps=dense_last_steps,
                         backend=backend)
        for name, value in (("base_rows", base_rows), ("base_cols", base_cols), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if temporal is not None and (isinstance(temporal, bool) or not isinstance(temporal, int) or temporal < 0):
            raise ValueError(f"temporal must be None or an integer >= 0, got {temporal!r}")
        if scale_ratio is not None and not (isinstance(scale_ratio, (int, float)) and scale_ratio > 1):
            raise ValueError(f"scale_ratio must be None (stock scale) or a number > 1, got {scale_ratio!r}")
        if scale_base_tokens is not None and (not isinstance(scale_base_tokens, int) or scale_base_tokens < 2):
            raise ValueError(f"scale_base_tokens must be None or an integer >= 2, got {scale_base_tokens!r}")
        if tiles is not None and (len(tiles) != 2 or any(not isinstance(t, int) or t < 1 for t in tiles)):
            raise ValueError(f"tiles must be None or (rows, cols) of positive integers, got {tiles!r}")
        self.base_rows, self.base_cols, self.block_size = base_rows, base_cols, block_size
        self.inward, self.temporal = bool(inward), temporal
        self.scale_ratio, self.scale_base_tokens = scale_ratio, scale_base_tokens
        self.tiles = None if tiles is None else tuple(tiles)
        self.token_order = "raster" if tiles is None else f"tiles{tiles[0]}x{tiles[1]}"
        self.cache_device = cache_device
        self._shared.freeswim = FreeSwimState(cache_device)

    def reset_state(self) -> None:
        super().reset_state()
        self._shared.freeswim = FreeSwimState(self.cache_device)

    @property
    def state(self) -> FreeSwimState:
        return self._shared.freeswim

    def knobs(self) -> dict:
        return {**super().knobs(), "base_rows": self.base_rows, "base_cols": self.base_cols, "inward": self.inward,
                "temporal": self.temporal, "scale_ratio": self.scale_ratio,
                "scale_base_tokens": self.scale_base_tokens, "block_size": self.block_size, "tiles": self.tiles,
                "cache_device": self.cache_device}

    def scale(self, head_dim: int) -> Optional[float]:
        """The softmax scale of both branches (``None``: the stock ``D**-0.5``)."""
        if self.scale_ratio is None:
            return None
        base = self.scale_base_tokens or self.base_rows * self.base_cols
        return freeswim_scale(head_dim, base, self.scale_ratio)

    dense_scale = scale  # FreeSwim's scale also where a policy (dense_layers, dense_steps) keeps a call dense

    def pattern(self, layout: TokenLayout, q: Any, k: Any):
        from ..patterns.window import window_pattern

        return window_pattern(layout, base_rows=self.base_rows, base_cols=self.base_cols, inward=self.inward,
                              temporal=self.temporal, block_size=self.block_size)

    def plan(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
        scale = self.scale(q.shape[-1])
        branch = self.context.current.branch if self.context is not None else None
        if branch == "full":
            return AttentionPlan.dense_path(scale)
        return AttentionPlan.single(self._pattern_for(layout, q, k), scale=scale)

    def cross_processor(self) -> "FreeSwimCrossProcessor":
        """The processor :func:`vidattn.apply` puts on the cross-attention modules (Wan and LTX-Video ``attn2``)."""
        return FreeSwimCrossProcessor(self._shared.freeswim)


class FreeSwimCrossProcessor:
    """Cross-attention with FreeSwim's roles (see the module docstring); one copy per layer, sharing the state."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: FreeSwimState) -> None:
        self.state = state
        self.layer_index: Optional[int] = None
        self.context = None
        self.adapter = None

    def for_layer(self, layer_index: int, context: Any, adapter: Any) -> "FreeSwimCrossProcessor":
        clone = FreeSwimCrossProcessor(self.state)
        clone.layer_index, clone.context, clone.adapter = layer_index, context, adapter
        clone._attention_backend, clone._parallel_config = self._attention_backend, self._parallel_config
        return clone

    def __repr__(self) -> str:
        return f"FreeSwimCrossProcessor(layer={self.layer_index})"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb: Any = None, **kwargs: Any) -> Any:
        role = self.context.current.cross if self.context is not None else "own"
        if role == "replay":
            return self.state.replay(self.layer_index, hidden_states).to(hidden_states.dtype)
        stock = self.adapter.stock_cross_processor(self)
        out = stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if role == "record":
            self.state.record(self.layer_index, out)
        return out
