"""Method patterns: pure functions of a :class:`~vidattn.layout.TokenLayout` that return a ``BlockPattern``."""
from .radial import RadialStats, radial_pattern, radial_stats

__all__ = ["RadialStats", "radial_pattern", "radial_stats"]
