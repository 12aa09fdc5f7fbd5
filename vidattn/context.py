"""StepContext: the per-forward facts a processor needs and diffusers does not pass to it."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .layout import TokenLayout

__all__ = ["PassContext", "StepContext"]

PASS_BRANCHES = (None, "full", "window")
CROSS_ROLES = ("own", "record", "replay")
CFG_HALVES = (None, "cond", "uncond")


@dataclass(frozen=True)
class PassContext:
    """Which pass the transformer calls inside :meth:`StepContext.passing` are, set explicitly by a pipeline.

    ``branch``: FreeSwim's ``"full"`` (full self-attention at the target size) or ``"window"`` branch (``None``:
    not a FreeSwim pass); ``cross``: what cross-attention processors do — ``"own"`` (stock), ``"record"`` (compute
    and store each layer's output) or ``"replay"`` (return the stored output of that layer); ``cfg``: ``"cond"`` or
    ``"uncond"`` when the pipeline runs the guidance halves as separate calls; ``step``: the refinement step the
    pipeline is on (the step hook's own count is the fallback for stock pipelines); ``training``.
    """

    branch: Optional[str] = None
    cross: str = "own"
    cfg: Optional[str] = None
    step: Optional[int] = None
    training: bool = False

    def __post_init__(self) -> None:
        if self.branch not in PASS_BRANCHES:
            raise ValueError(f"branch must be one of {PASS_BRANCHES}, got {self.branch!r}")
        if self.cross not in CROSS_ROLES:
            raise ValueError(f"cross must be one of {CROSS_ROLES}, got {self.cross!r}")
        if self.cfg not in CFG_HALVES:
            raise ValueError(f"cfg must be one of {CFG_HALVES}, got {self.cfg!r}")


@dataclass
class StepContext:
    """Denoising step, CFG branch, timestep and latent token grid of the transformer call in progress.

    One object per installed pipeline, shared by all its transformers (Wan 2.2's two experts) and filled by a
    forward pre-hook. With a pipeline, the 0-based ``step`` is the index of the nearest timestep in the pipeline's
    *current* ``scheduler.timesteps`` (read at every call, so a swapped scheduler counts; the tolerance covers
    timesteps cast to bf16). Without one, steps are counted: calls with the same timestep are CFG branches of one
    step (``branch`` 0, 1, ...), a move in the schedule's direction (decreasing for most models, increasing for
    Mochi; learnt from the first two values) is the next step, and a move against it starts a new generation.

    The pipeline is held weakly. Pickling drops it, and so does a deep copy unless the pipeline is copied along
    (then the copy refers to the copied pipeline): such a context counts steps (``num_steps`` unknown, so
    ``dense_last_steps`` is ignored) until the processor is applied again.
    """

    pipeline: Any = None
    step: int = -1
    branch: int = 0
    timestep: Optional[float] = None
    grid: Optional[tuple[int, int, int]] = None
    #: prepared by the pre-hook for the call in progress (host-side, so compiled graphs read constants):
    #: the attention layout (``None`` where the adapter cannot tell it from the forward's inputs) and why this step
    #: runs dense (``None``: sparse)
    layout: Optional[TokenLayout] = None
    step_reason: Optional[str] = None
    #: the pass the pipeline declared for the calls in progress (:meth:`passing`); the default pass otherwise
    current: PassContext = field(default_factory=PassContext)
    #: the call in progress is a training pass (``passing(training=True)``, or a module in train mode with
    #: gradients): per-sample random timesteps, no denoising step (``step`` -1), so the step knobs do not apply
    training: bool = False
    calls: int = 0
    generations: int = 0
    _last: Optional[float] = field(default=None, repr=False)
    _last_index: Optional[int] = field(default=None, repr=False)
    _direction: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.pipeline is not None and not isinstance(self.pipeline, weakref.ref):
            self.pipeline = weakref.ref(self.pipeline)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pipeline": None}

    def __deepcopy__(self, memo: dict) -> StepContext:
        pipe = self.pipeline() if self.pipeline is not None else None
        return dataclasses.replace(self, pipeline=None if pipe is None else memo.get(id(pipe)))

    @property
    def scheduler(self) -> Any:
        pipe = self.pipeline() if self.pipeline is not None else None
        return getattr(pipe, "scheduler", None)

    @property
    def num_steps(self) -> Optional[int]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        try:
            return len(timesteps)
        except TypeError:
            return None

    def observe(self, timestep: Optional[torch.Tensor | float], grid: Optional[tuple[int, int, int]],
                training: bool = False) -> None:
        """Record one transformer call. A training call (``training`` or the declared pass says so) has no step:
        ``step`` is -1 and the next inference call starts a new generation."""
        self.calls += 1
        self.grid = grid
        self.training = training or self.current.training
        if self.training:
            self.step, self.branch, self.timestep = -1, 0, None
            self._last = self._last_index = None
            return
        if timestep is None:
            return
        t = float(timestep.float().max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        index = self._scheduled_index(t)
        if index is not None:
            if self._last_index is None or index < self._last_index:
                self._new_generation()
            elif index == self._last_index:
                self.branch += 1
            else:
                self.branch = 0
            self.step = index
            self._last_index = index
        else:
            self._count(t)
        self._last = t
        self.timestep = t

    @contextlib.contextmanager
    def passing(self, **fields: Any) -> Iterator[PassContext]:
        """Declare the pass of the transformer calls in the ``with`` block (see :class:`PassContext`); restores the
        previous pass on exit, also on errors."""
        previous = self.current
        self.current = PassContext(**fields)
        try:
            yield self.current
        finally:
            self.current = previous

    def set_layout(self, layout: Optional[TokenLayout]) -> None:
        """Record this call's layout, keeping the previous object when equal (compiled graphs guard on identity)."""
        if layout != self.layout:
            self.layout = layout

    def _new_generation(self) -> None:
        self.generations += 1
        self.step, self.branch, self._direction = 0, 0, 0

    def _count(self, t: float) -> None:
        if self._last is None:
            self._new_generation()
            return
        if t == self._last:
            self.branch += 1
            return
        direction = 1 if t > self._last else -1
        if self._direction in (0, direction):
            self._direction = direction
            self.step, self.branch = self.step + 1, 0
        else:
            self._new_generation()

    def _scheduled_index(self, t: float) -> Optional[int]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        distance = (timesteps.detach().float().cpu() - t).abs()
        index = int(distance.argmin())
        # bf16 keeps ~3 significant digits: accept the nearest scheduled value within 1 % (+ a small floor).
        return index if float(distance[index]) <= 1e-2 * abs(t) + 1e-3 else None
