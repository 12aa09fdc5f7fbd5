"""RadialProcessor: Radial Attention's static energy-decay block mask (spec ``radial.md``) as a processor."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..kernels import BlockPattern
from ..layout import TokenLayout
from ..patterns.radial import MODEL_GEOMETRY, radial_pattern
from .base import SparseAttentionProcessor

__all__ = ["RadialProcessor", "RADIAL_PRESETS"]

# Upstream settings (spec radial.md §3): processor knobs plus the generation settings they were published with.
RADIAL_PRESETS: dict[str, dict[str, Any]] = {
    "wan-1x": dict(decay=0.2, dense_steps=12, dense_layers=1,
                   generation=dict(height=768, width=1280, num_frames=69, num_inference_steps=50, guidance_scale=5.0)),
    "wan-2x": dict(decay=1.0, dense_steps=2, dense_layers=2,
                   generation=dict(height=720, width=1280, num_frames=161, num_inference_steps=50,
                                   guidance_scale=5.0)),
    "wan-lightx2v": dict(decay=0.2, dense_steps=1, dense_layers=1,
                         generation=dict(height=768, width=1280, num_frames=69, num_inference_steps=4,
                                         guidance_scale=1.0)),
    "wan-fusionx": dict(decay=0.2, dense_steps=2, dense_layers=1,
                        generation=dict(height=768, width=1280, num_frames=69, num_inference_steps=8,
                                        guidance_scale=1.0)),
    "wan22-1x": dict(decay=0.8, dense_steps=11, dense_layers=1, block_size=64,
                     generation=dict(height=768, width=1280, num_frames=77, num_inference_steps=40,
                                     guidance_scale=4.0)),
    "hunyuan-1x": dict(decay=0.95, dense_steps=12, dense_layers=0,
                       generation=dict(height=768, width=1280, num_frames=117, num_inference_steps=50)),
    "hunyuan-2x": dict(decay=1.0, dense_steps=2, dense_layers=2,
                       generation=dict(height=720, width=1280, num_frames=253, num_inference_steps=50)),
    "hunyuan-4x": dict(decay=1.0, dense_steps=2, dense_layers=2,
                       generation=dict(height=720, width=1280, num_frames=509, num_inference_steps=50)),
    "mochi-2x": dict(decay=1.0, dense_steps=2, dense_layers=2,
                     generation=dict(height=480, width=848, num_frames=331, num_inference_steps=64)),
    "mochi-4x": dict(decay=1.0, dense_steps=2, dense_layers=2,
                     generation=dict(height=480, width=848, num_frames=667, num_inference_steps=64)),
}


class RadialProcessor(SparseAttentionProcessor):
    """Radial Attention: video-video bands that halve in width per doubling of the frame distance, O(n log n).

    ``decay`` (> 0) scales the bands of frame distances >= 2; ``sink_frames`` (``None``: the model's default — Wan,
    CogVideoX, LTX, Mochi 1; HunyuanVideo 0) key frames are seen by every query; ``d1_full`` keeps adjacent frames
    whole; ``decimation_threshold`` is the band width (tokens) below which frame distances are decimated. Text
    rows and columns of joint-attention models are dense; padded text keys are masked per sample. The warm-up
    knobs (``dense_steps``, ``dense_layers``, ``dense_last_steps``) run those steps/layers through the stock dense
    path.
    """

    method = "radial"

    def __init__(self, decay: float = 1.0, dense_steps: int = 0, dense_layers: int = 0, dense_last_steps: int = 0,
                 block_size: int = 128, backend: str = "auto", *, sink_frames: Optional[int] = None,
                 d1_full: bool = True, decimation_threshold: float = 128) -> None:
        super().__init__(dense_steps=dense_steps, dense_layers=dense_layers, dense_last_steps=dense_last_steps,
                         backend=backend)
        if sink_frames is not None and (isinstance(sink_frames, bool) or not isinstance(sink_frames, int)
                                        or sink_frames < 0):
            raise ValueError(f"sink_frames must be None or an integer >= 0, got {sink_frames!r}")
        # Validate the other knobs now: a bad value must fail here, not at the first denoising step.
        radial_pattern(TokenLayout(1, 1, 1), decay=decay, block_size=block_size, d1_full=d1_full,
                       decimation_threshold=decimation_threshold)
        self.decay = decay
        self.block_size = block_size
        self.sink_frames = sink_frames
        self.d1_full = d1_full
        self.decimation_threshold = decimation_threshold

    def knobs(self) -> dict:
        return {**super().knobs(), "decay": self.decay, "block_size": self.block_size,
                "sink_frames": self.sink_frames, "d1_full": self.d1_full,
                "decimation_threshold": self.decimation_threshold}

    def _sink(self, layout: TokenLayout) -> int:
        if self.sink_frames is not None:
            return min(self.sink_frames, layout.frames)
        family = self.family or "wan"
        return MODEL_GEOMETRY[family].sink_frames if family in MODEL_GEOMETRY else 1

    def pattern(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> BlockPattern:
        return radial_pattern(layout, decay=self.decay, block_size=self.block_size, sink_frames=self._sink(layout),
                              d1_full=self.d1_full, decimation_threshold=self.decimation_threshold)
