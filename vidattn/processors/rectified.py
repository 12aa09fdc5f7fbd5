"""RectifiedProcessor: Rectified SpaAttn (spec ``rectified.md``) as a processor.

Per call and head: pooled block estimate of full attention, critical blocks (top-p with a top-k floor, 26-neighbour
blocks under the Gilbert curve, text blocks, first-frame rule, diagonal), IPAR and GAPR rectification, and the
sparse kernels with the fused ``out * R + O_nc`` epilogue (:func:`vidattn.patterns.rectified.rectified_plan`).
The video tokens run in Gilbert order: the model's split-point hooks put the whole forward in it once
(``vidattn.apply``), else this processor permutes q, k, v per layer. Text rows are dense over the valid keys;
CogVideoX's leading text is moved after the video inside the plan.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..layout import TokenLayout
from ..patterns.rectified import FIRST_FRAME_RULES, rectified_plan
from ..plan import AttentionPlan
from .base import SparseAttentionProcessor, _bounded_get

__all__ = ["RectifiedProcessor", "RECTIFIED_PRESETS"]

# Spec rectified.md §3; generation settings are those the upstream scripts publish.
RECTIFIED_PRESETS: dict[str, dict[str, Any]] = {
    "wan-t2v": dict(drop_rate=0.75, dense_steps=5, dense_layers=2, first_frame="corner",
                    generation=dict(height=720, width=1280, num_frames=81, num_inference_steps=50,
                                    guidance_scale=5.0)),
    "wan-i2v": dict(drop_rate=0.75, dense_layers=2, first_frame="corner"),
    "wan-i2v-fast": dict(drop_rate=0.85, dense_layers=2, first_frame="corner"),
    "wan22": dict(drop_rate=0.85, dense_layers=2, first_frame="corner",
                  generation=dict(num_inference_steps=40)),
    "hunyuan": dict(drop_rate=0.8, first_frame="off",
                    generation=dict(height=720, width=1280, num_frames=129, num_inference_steps=50)),
    "hunyuan-fast": dict(drop_rate=0.9, first_frame="off",
                         generation=dict(height=720, width=1280, num_frames=129, num_inference_steps=50)),
    "cogvideox": dict(drop_rate=0.75, dense_steps=5, first_frame="off",
                      generation=dict(height=768, width=1360, num_frames=81, num_inference_steps=50)),
}

_TOKEN_ORDERS = ("gilbert", "raster")


class RectifiedProcessor(SparseAttentionProcessor):
    """Rectified SpaAttn: dynamic per-head critical blocks with IPAR/GAPR rectification (spec ``rectified.md``).

    ``drop_rate`` sets the top-k floor ``int((1 - drop_rate) * n_video_blocks)``; ``top_p`` the pooled-mass
    threshold; ``first_frame`` ``"corner"`` (upstream's Wan rule), ``"frame0"``, ``"off"`` or ``None`` (corner on
    Wan, off elsewhere); ``gapr=False`` compensates every non-critical block (ablation); ``token_order="raster"``
    is the ablation without the curve (and without the neighbour rule, which is defined under the curve).
    """

    method = "rectified"
    static_pattern = False

    def __init__(self, drop_rate: float = 0.75, top_p: float = 0.3, block_size: int = 128,
                 first_frame: Optional[str] = None, gapr: bool = True, dense_steps: int = 0, dense_layers: int = 0,
                 dense_last_steps: int = 0, backend: str = "auto", *, token_order: str = "gilbert") -> None:
        super().__init__(dense_steps=dense_steps, dense_layers=dense_layers, dense_last_steps=dense_last_steps,
                         backend=backend)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer (e.g. 64 or 128), got {block_size!r}")
        if first_frame is not None and first_frame not in FIRST_FRAME_RULES:
            raise ValueError(f"first_frame must be None or one of {FIRST_FRAME_RULES}, got {first_frame!r}")
        if not isinstance(gapr, bool):
            raise ValueError(f"gapr must be True or False, got {gapr!r}")
        if token_order not in _TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {_TOKEN_ORDERS}, got {token_order!r}")
        self.drop_rate, self.top_p, self.block_size = float(drop_rate), float(top_p), block_size
        self.first_frame, self.gapr, self.token_order = first_frame, gapr, token_order

    def knobs(self) -> dict:
        return {**super().knobs(), "drop_rate": self.drop_rate, "top_p": self.top_p, "block_size": self.block_size,
                "first_frame": self.first_frame, "gapr": self.gapr, "token_order": self.token_order}

    def _first_frame(self) -> str:
        if self.first_frame is not None:
            return self.first_frame
        return "corner" if (self.family or "wan") == "wan" else "off"

    def _text_valid(self, layout: TokenLayout, device: torch.device) -> Optional[torch.Tensor]:
        if layout.text is None or layout.text.valid is None:
            return None
        return _bounded_get(self._shared.masked, ("text_valid", layout.text.valid, device), 16,
                            lambda: torch.tensor(layout.text.valid, device=device))

    def _text_last(self, layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, inverse)`` moving leading text (CogVideoX) after the video."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            n_text, seq = layout.text_tokens, layout.seq_len
            perm = torch.cat([torch.arange(n_text, seq), torch.arange(n_text)]).to(device)
            inverse = torch.cat([torch.arange(seq - n_text, seq), torch.arange(seq - n_text)]).to(device)
            return perm, inverse
        return _bounded_get(self._shared.orders, ("text-last", layout.seq_len, layout.text_tokens, device), 8, build)

    def plan(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
        """Select, rectify and plan this call (BSHD q, k, v with the video in ``layout.order``)."""
        perm = inverse = None
        if layout.text is not None and layout.text.position == "first" and layout.text_tokens:
            perm, inverse = self._text_last(layout, q.device)
            q, k, v = (t.index_select(1, perm) for t in (q, k, v))
        grid = (layout.frames, layout.height, layout.width)
        curve = layout.order == "gilbert"
        order = None if curve else torch.arange(layout.video_tokens, device=q.device)
        plan, stats = rectified_plan(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid=grid, drop_rate=self.drop_rate,
            top_p=self.top_p, block_size=self.block_size, neighbours=None if curve else False,
            first_frame=self._first_frame(), gapr=self.gapr, text_valid=self._text_valid(layout, q.device),
            order=order)
        if getattr(self._shared, "record_stats", False):
            self._shared.last_stats = (layout, stats)
        if perm is None:
            return plan
        return AttentionPlan(plan.parts, plan.scale, perm, inverse)

    def record_selection(self, enabled: bool = True) -> None:
        """Keep the latest call's ``(layout, RectifiedStats)`` in :attr:`recorded_selection` (all layer copies of
        this installation share it; used by ``vidattn mask rectified``)."""
        self._shared.record_stats = enabled

    @property
    def recorded_selection(self):
        return getattr(self._shared, "last_stats", None)
