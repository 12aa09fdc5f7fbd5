"""What the demo records while a pipeline runs: the computed fraction of attention per layer, and the plan of one
chosen layer's last sparse call (its block pattern, or Rectified SpaAttn's per-head selection)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from vidattn.processors import SparseAttentionProcessor

__all__ = ["LayerRecorder"]


@dataclass
class LayerRecorder:
    """Install with :meth:`attached`: forward hooks on the attention modules of the pipeline's transformers read
    the installed processor's shared statistics before and after each module runs, so every call is attributed to
    its layer (this also works when a pipeline installs its processor during the call, as FreeSwim's does).

    ``layers[i]`` holds ``[computed, calls]`` (a dense call computes 1; ``computed`` may be a device tensor until
    :meth:`densities` reads it); ``captured`` is the chosen layer's last sparse call: ``("pattern", layout,
    pattern)`` for static methods, ``("selection", layout, stats)`` for Rectified SpaAttn, ``None`` when it never
    ran sparse.
    """

    layer: int = 0
    layers: dict = field(default_factory=dict)
    captured: Optional[tuple] = None
    _before: Optional[tuple] = None

    def densities(self) -> list[Optional[float]]:
        """Computed fraction per layer index (``None`` for an index that ran no call)."""
        if not self.layers:
            return []
        return [float(self.layers[i][0]) / self.layers[i][1] if i in self.layers else None
                for i in range(max(self.layers) + 1)]

    @staticmethod
    def _processor(module: Any) -> Optional[SparseAttentionProcessor]:
        proc = getattr(module, "processor", None)
        ok = isinstance(proc, SparseAttentionProcessor) and proc.layer_index is not None
        return proc if ok else None

    def _enter(self, module: Any, args: Any) -> None:
        proc = self._processor(module)
        if proc is not None:
            stats = proc.stats
            total = stats.density_sum  # a device tensor for dynamic plans, added to in place: keep a copy
            self._before = (stats.sparse_calls, stats.dense_calls, total.clone() if torch.is_tensor(total) else total)

    def _leave(self, module: Any, args: Any, output: Any) -> None:
        proc, before, self._before = self._processor(module), self._before, None
        if proc is None or before is None:
            return
        stats = proc.stats
        sparse, dense = stats.sparse_calls - before[0], stats.dense_calls - before[1]
        if sparse + dense == 0:
            return
        entry = self.layers.setdefault(proc.layer_index, [0.0, 0])
        entry[0] = entry[0] + (stats.density_sum - before[2]) + dense
        entry[1] += sparse + dense
        if sparse and proc.layer_index == self.layer:
            self._capture(proc)

    def _capture(self, proc: SparseAttentionProcessor) -> None:
        if hasattr(proc, "record_selection"):
            found = proc.recorded_selection
            if found is not None:
                self.captured = ("selection", *found)
        elif proc.static_pattern and proc.context is not None and proc.context.layout is not None:
            layout = proc.context.layout
            self.captured = ("pattern", layout, proc.pattern(layout, None, None))

    @contextlib.contextmanager
    def attached(self, pipe: Any, processor: SparseAttentionProcessor) -> Iterator["LayerRecorder"]:
        """Record while the block runs; the hooks are removed on exit."""
        if hasattr(processor, "record_selection"):
            processor.record_selection(True)
        handles = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            for module in (model.modules() if model is not None else ()):
                if hasattr(module, "processor"):
                    handles.append(module.register_forward_pre_hook(self._enter))
                    handles.append(module.register_forward_hook(self._leave))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if hasattr(processor, "record_selection"):
                processor.record_selection(False)
