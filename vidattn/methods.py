"""The attention methods by name, with their presets (used by the CLI, the demo and the batch runner)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .processors import DenseProcessor, FullProcessor, SparseAttentionProcessor
from .processors.radial import RADIAL_PRESETS, RadialProcessor
from .processors.freeswim import FREESWIM_PRESETS, FreeSwimProcessor
from .processors.rectified import RECTIFIED_PRESETS, RectifiedProcessor

__all__ = ["MethodSpec", "METHODS", "make_processor", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A method name, its processor class, its presets (name -> knob dict) and the knobs it accepts."""

    name: str
    factory: Callable[..., SparseAttentionProcessor]
    presets: dict = field(default_factory=dict)
    knobs: tuple[str, ...] = ("dense_steps", "dense_layers", "dense_last_steps", "backend")
    help: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


register_method(MethodSpec("dense", DenseProcessor, knobs=(), help="stock dense attention (the baseline)"))
register_method(MethodSpec("full", FullProcessor, knobs=("backend", "block_size"),
                           help="all-ones pattern through the sparse kernels (a probe: equals dense)"))
register_method(MethodSpec("radial", RadialProcessor, presets=RADIAL_PRESETS,
                           knobs=("decay", "dense_steps", "dense_layers", "dense_last_steps", "block_size", "backend",
                                  "sink_frames", "d1_full", "decimation_threshold"),
                           help="Radial Attention: static energy-decay block mask, O(n log n)"))
register_method(MethodSpec("rectified", RectifiedProcessor, presets=RECTIFIED_PRESETS,
                           knobs=("drop_rate", "top_p", "block_size", "first_frame", "gapr", "dense_steps",
                                  "dense_layers", "dense_last_steps", "backend", "token_order"),
                           help="Rectified SpaAttn: per-head pooled selection with IPAR/GAPR rectification"))
register_method(MethodSpec("freeswim", FreeSwimProcessor, presets=FREESWIM_PRESETS,
                           knobs=("base_rows", "base_cols", "inward", "temporal", "scale_ratio", "scale_base_tokens",
                                  "block_size", "tiles", "cache_device", "dense_steps", "dense_layers",
                                  "dense_last_steps", "backend"),
                           help="FreeSwim: inward window self-attention of the base grid with cross-attention "
                                "override (high resolution; generate runs FreeSwimPipeline)"))


def make_processor(method: str, preset: Optional[str] = None, **overrides: Any) -> SparseAttentionProcessor:
    """Processor for ``method``, starting from ``preset``'s knobs, then ``overrides`` (``None`` values ignored)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    spec = METHODS[method]
    knobs: dict = {}
    if preset is not None:
        if preset not in spec.presets:
            accepted = f"one of {sorted(spec.presets)}" if spec.presets else "omitted (this method has no presets)"
            raise ValueError(f"preset for method {method!r} must be {accepted}, got {preset!r}")
        knobs.update({k: v for k, v in spec.presets[preset].items() if k in spec.knobs})
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in spec.knobs:
            takes = f"it takes {list(spec.knobs)}" if spec.knobs else "it takes no knobs"
            raise ValueError(f"method {method!r} does not take {key!r}; {takes}")
        knobs[key] = value
    return spec.factory(**knobs)
