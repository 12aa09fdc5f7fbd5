"""StepContext: the per-forward facts a processor needs and diffusers does not pass to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["StepContext"]

GridFn = Callable[[tuple, dict], Optional[tuple[int, int, int]]]


@dataclass
class StepContext:
    """Denoising step, CFG branch, timestep and latent token grid of the transformer call in progress.

    One object per installed pipeline, shared by all its transformers (Wan 2.2's two experts) and filled by a
    forward pre-hook. The 0-based ``step`` is the index of the timestep in ``scheduler.timesteps`` when a scheduler
    is known; otherwise it counts distinct timesteps: calls with the same timestep are CFG branches of one step
    (``branch`` 0, 1, ...), a lower timestep is the next step, and a higher one starts a new generation.
    """

    scheduler: Any = None
    step: int = -1
    branch: int = 0
    timestep: Optional[float] = None
    grid: Optional[tuple[int, int, int]] = None
    calls: int = 0
    generations: int = 0
    _last: Optional[float] = field(default=None, repr=False)

    @property
    def num_steps(self) -> Optional[int]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        try:
            return len(timesteps)
        except TypeError:
            return None

    def reset(self) -> None:
        self.step, self.branch, self.timestep, self.grid, self._last = -1, 0, None, None, None

    def observe(self, timestep: Optional[torch.Tensor | float], grid: Optional[tuple[int, int, int]]) -> None:
        """Record one transformer call."""
        self.calls += 1
        self.grid = grid
        if timestep is None:
            return
        t = float(timestep.float().max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last is None or t > self._last:
            self.generations += 1
            self.step, self.branch = 0, 0
        elif t == self._last:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self._last = t
        self.timestep = t
        scheduled = self._scheduled_index(t)
        if scheduled is not None:
            self.step = scheduled

    def _scheduled_index(self, t: float) -> Optional[int]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        hits = torch.nonzero(torch.isclose(timesteps.float().cpu(), torch.tensor(t), rtol=0, atol=1e-4)).flatten()
        return int(hits[0]) if hits.numel() else None
