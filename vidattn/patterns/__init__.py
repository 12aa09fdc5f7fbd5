"""Method patterns: pure functions of a :class:`~vidattn.layout.TokenLayout` (static) or of q, k (dynamic)."""
from .radial import RadialStats, radial_pattern, radial_stats
from .rectified import RectifiedStats, critical_pattern, rectified_attention, rectified_plan, rectified_selection
from .window import window_pattern, window_token_density

__all__ = ["RadialStats", "RectifiedStats", "critical_pattern", "radial_pattern", "radial_stats",
           "rectified_attention", "rectified_plan", "rectified_selection", "window_pattern", "window_token_density"]
