"""AttentionPlan: what a method hands the processor for one attention call.

The base processor executes plans and knows no method. A plan lists *parts*, each a contiguous range of query rows
with its :class:`BlockPattern` (head-shared, or per (batch, head) for dynamic methods) and optional
:class:`Epilogue`, one softmax ``scale`` for all of them (``None``: ``D**-0.5``), and optionally a sequence order
``perm`` in which the parts are written (the processor gathers q, k, v into it and puts the output back):

    out[:, perm[r0:r1]] = sparse_attention(q[:, perm][:, r0:r1], k[:, perm], v[:, perm], part.pattern,
                                           scale=scale, epilogue=part.epilogue)       for each part

Radial: one part over the whole sequence. Rectified SpaAttn: the video rows with a per-head pattern and the
rectification epilogue, then the text rows dense over the valid keys (with ``perm`` moving CogVideoX's leading text
to the end). FreeSwim: its own ``scale``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kernels import BlockPattern, Epilogue, sparse_attention

__all__ = ["AttentionPlan", "PlanPart", "execute_plan"]


@dataclass(frozen=True, eq=False)
class PlanPart:
    """Query rows ``[start, stop)`` (in the plan's order) attend through ``pattern`` (``q_len = stop - start``)."""

    start: int
    stop: int
    pattern: BlockPattern
    epilogue: Optional[Epilogue] = None

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop or self.pattern.q_len != self.stop - self.start:
            raise ValueError(f"plan part rows [{self.start}, {self.stop}) must be non-empty and match the pattern's "
                             f"q_len={self.pattern.q_len}")


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """Parts covering the query rows ``0..S`` in order, a shared softmax ``scale`` and an optional sequence order
    ``perm`` with its ``inverse`` (see the module docstring)."""

    parts: tuple[PlanPart, ...]
    scale: Optional[float] = None
    perm: Optional[torch.Tensor] = None
    inverse: Optional[torch.Tensor] = None
    dense: bool = False  # no parts: the stock dense path (diffusers' dispatcher) with this plan's scale

    def __post_init__(self) -> None:
        if self.dense:
            if self.parts or self.perm is not None:
                raise ValueError("a dense plan has no parts and no order")
            return
        if not self.parts:
            raise ValueError("a plan needs at least one part")
        edge = 0
        for part in self.parts:
            if part.start != edge:
                raise ValueError(f"plan parts must cover the rows contiguously from 0; a part starts at "
                                 f"{part.start}, expected {edge}")
            edge = part.stop
        if (self.perm is None) != (self.inverse is None):
            raise ValueError("a plan's perm and inverse come together")

    @classmethod
    def single(cls, pattern: BlockPattern, scale: Optional[float] = None) -> "AttentionPlan":
        """One pattern over all query rows (static methods)."""
        return cls(parts=(PlanPart(0, pattern.q_len, pattern),), scale=scale)

    @classmethod
    def dense_path(cls, scale: Optional[float] = None) -> "AttentionPlan":
        """Full attention through the stock dense path (diffusers' dispatcher, so the user's attention backend is
        kept) with a method's own ``scale`` (FreeSwim's full branch)."""
        return cls(parts=(), scale=scale, dense=True)

    @property
    def q_len(self) -> int:
        return self.parts[-1].stop

    def density(self) -> torch.Tensor | float:
        """Fraction of the token pairs the plan's kernels compute (row-weighted over parts). A float for head-shared
        patterns; for per-head patterns a device tensor (no host synchronisation; stats convert it when read)."""
        if self.dense:
            return 1.0
        total = 0.0
        for part in self.parts:
            total = total + part.pattern.density_value() * (part.stop - part.start)
        return total / self.q_len


def execute_plan(plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
                 layout: str = "bshd") -> torch.Tensor:
    """Run ``plan`` on q, k, v (``layout`` "bshd", diffusers' order, or "bhsd"); returns the output in that layout.
    Dense plans are run by their caller (the stock path)."""
    if plan.dense:
        raise ValueError("a dense plan runs through the caller's dense path, not execute_plan")
    dim = 1 if layout == "bshd" else 2
    if plan.perm is not None:
        perm = plan.perm.to(q.device)
        q, k, v = (t.index_select(dim, perm) for t in (q, k, v))
    outs = []
    for part in plan.parts:
        rows = q.narrow(dim, part.start, part.stop - part.start)
        outs.append(sparse_attention(rows, k, v, part.pattern, scale=plan.scale, epilogue=part.epilogue,
                                     backend=backend, layout=layout))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim)
    if plan.inverse is not None:
        out = out.index_select(dim, plan.inverse.to(out.device))
    return out
