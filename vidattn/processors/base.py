"""SparseAttentionProcessor: what every vidattn method shares.

A processor is installed on each self-attention module of a transformer. Per call it computes q, k, v exactly as
the stock diffusers processor does (through the model adapter), then decides:

* dense — warm-up steps (``step < dense_steps``), last steps (``step >= num_steps - dense_last_steps``), dense
  layers (``layer < dense_layers``) or no known token layout: diffusers' own ``dispatch_attention_fn``, so the
  user's attention backend is kept;
* sparse — ``plan = self.plan(layout, q, k, v)`` (an :class:`~vidattn.plan.AttentionPlan`: patterns per row range,
  scale, epilogue) executed through ``vidattn.kernels.sparse_attention``.

Methods subclass it and implement :meth:`pattern` (static methods: one pattern, cached per layout) or :meth:`plan`
(dynamic methods, ``static_pattern = False``). A method whose plans want the video tokens in another order
(``token_order``, e.g. ``"gilbert"``) gets them so: from the model's split-point hooks (the layout says so), else by
permuting q, k, v here and the output back (logged once).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..context import StepContext
from ..kernels import BACKENDS, BlockPattern, sparse_attention
from ..kernels.cpu_ext import ensure_built
from ..layout import TOKEN_ORDERS, TokenLayout
from ..parallel import context_parallel_attention, cp_degree
from ..plan import AttentionPlan, execute_plan
from ..token_order import is_token_order, sequence_permutation

__all__ = ["SparseAttentionProcessor", "ProcessorStats", "FullProcessor", "DenseProcessor"]

logger = logging.getLogger("vidattn")


@dataclass
class ProcessorStats:
    """Counters shared by all per-layer copies of one installed processor."""

    sparse_calls: int = 0
    dense_calls: int = 0
    density_sum: float = 0.0
    sparse_seconds: float = 0.0
    dense_seconds: float = 0.0
    dense_reasons: dict = field(default_factory=dict)

    def record(self, sparse: bool, density: float | torch.Tensor, seconds: float, reason: str = "") -> None:
        """One call; ``density`` may be a device tensor (dynamic plans: read when :meth:`summary` is called)."""
        if sparse:
            self.sparse_calls += 1
            self.density_sum += density
            self.sparse_seconds += seconds
        else:
            self.dense_calls += 1
            self.dense_seconds += seconds
            self.dense_reasons[reason] = self.dense_reasons.get(reason, 0) + 1

    @property
    def calls(self) -> int:
        return self.sparse_calls + self.dense_calls

    def summary(self) -> dict:
        """Counts, times, the mean density of sparse calls and the computed fraction over all calls."""
        density_sum = float(self.density_sum)
        sparse_density = density_sum / self.sparse_calls if self.sparse_calls else None
        computed = (density_sum + self.dense_calls) / self.calls if self.calls else None
        return {
            "calls": self.calls,
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
            "dense_reasons": dict(self.dense_reasons),
            "sparse_density": sparse_density,
            "computed_fraction": computed,
            "sparse_seconds": round(self.sparse_seconds, 4),
            "dense_seconds": round(self.dense_seconds, 4),
        }

    def reset(self) -> None:
        self.__init__()


def _bounded_get(cache: dict, key: Any, size: int, build) -> Any:
    """``cache[key]``, built on a miss; the oldest entry is dropped beyond ``size``."""
    if key not in cache:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


class _Shared:
    """State shared by the per-layer copies of one processor: stats, pattern cache, messages logged once."""

    def __init__(self) -> None:
        self.stats = ProcessorStats()
        self.patterns: dict = {}
        self.masked: dict = {}
        self.logged: set = set()
        self.rope: tuple = (None, None)
        self.prepared: Optional[tuple] = None  # the pre-hook's (layout, device, pattern)
        self.orders: dict = {}  # (layout, order, device) -> (perm, inverse) for processors that permute q/k/v


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


class SparseAttentionProcessor:
    """Base of all vidattn processors (see the module docstring)."""

    _attention_backend = None
    _parallel_config = None
    method = "sparse"
    static_pattern = True
    uses_pattern = True  # False for methods that never run the sparse kernels
    token_order = "raster"  # the video token order this method's plans are built in
    _pattern_cache_size = 16

    def __init__(self, *, dense_steps: int = 0, dense_layers: int = 0, dense_last_steps: int = 0,
                 backend: str = "auto") -> None:
        self.dense_steps = _non_negative_int("dense_steps", dense_steps)
        self.dense_layers = _non_negative_int("dense_layers", dense_layers)
        self.dense_last_steps = _non_negative_int("dense_last_steps", dense_last_steps)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.layer_index: Optional[int] = None
        self.dense_layer = False  # layer_index < dense_layers, fixed per copy (compiled blocks share one graph)
        self.context: Optional[StepContext] = None
        self.adapter = None
        self._shared = _Shared()

    # ------------------------------------------------------------------ configuration
    def knobs(self) -> dict:
        """The settings that define this processor (for metadata sidecars and reprs)."""
        return {"method": self.method, "dense_steps": self.dense_steps, "dense_layers": self.dense_layers,
                "dense_last_steps": self.dense_last_steps, "backend": self.backend}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.knobs().items() if k != "method")
        layer = "" if self.layer_index is None else f", layer={self.layer_index}"
        return f"{type(self).__name__}({args}{layer})"

    @property
    def family(self) -> Optional[str]:
        """The model family this processor runs on: its adapter's, or (shared instance) the last module's."""
        return self.adapter.name if self.adapter is not None else getattr(self, "_family", None)

    @property
    def stats(self) -> ProcessorStats:
        return self._shared.stats

    def reset_state(self) -> None:
        """Fresh statistics, pattern cache and log-once memory (copies made afterwards share the new state)."""
        self._shared = _Shared()

    def for_layer(self, layer_index: int, context: Optional[StepContext], adapter=None) -> "SparseAttentionProcessor":
        """A copy for one layer: same knobs, shared stats and pattern cache, its own layer index and model adapter."""
        clone = copy.copy(self)
        clone.layer_index = layer_index
        clone.dense_layer = layer_index < self.dense_layers
        clone.context = context
        clone.adapter = adapter
        return clone

    def log_once(self, key: str, message: str, level: int = logging.INFO) -> None:
        """Log ``message`` the first time ``key`` is seen by this installation (never inside a compiled graph)."""
        if torch.compiler.is_compiling():
            return
        if key not in self._shared.logged:
            self._shared.logged.add(key)
            logger.log(level, message)

    # ------------------------------------------------------------------ the method's part
    def pattern(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> BlockPattern:
        """The block pattern for this call (``q``, ``k`` are BSHD). Static methods ignore q and k."""
        raise NotImplementedError

    def dense_scale(self, head_dim: int) -> Optional[float]:
        """The softmax scale of calls this method leaves dense by policy (warm-up steps, dense layers): ``None``,
        the stock ``D**-0.5``, unless the method changes the logits everywhere (FreeSwim)."""
        return None

    def _dense(self, dense_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = self.dense_scale(q.shape[-1])
        return dense_fn(q, k, v) if scale is None else dense_fn(q, k, v, scale=scale)

    def plan(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
        """The attention plan of this call (BSHD q, k, v in ``layout``'s order): by default one pattern over all rows
        (:meth:`pattern`); dynamic methods override it."""
        return AttentionPlan.single(self._pattern_for(layout, q, k))

    def _pattern_for(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> BlockPattern:
        """The pattern the pre-hook prepared for this layout, else built here (see :meth:`_static_pattern`)."""
        prepared = self._shared.prepared
        if prepared is not None and prepared[0] is layout and prepared[1] == q.device:
            return prepared[2]
        if not self.static_pattern:
            return self.pattern(layout, q, k)
        return self._static_pattern(layout, q.device)

    @torch.compiler.disable
    def _static_pattern(self, layout: TokenLayout, device: torch.device) -> BlockPattern:
        """Static patterns: built once per (layout without text validity, device), then once per set of per-sample
        key lengths; both caches are bounded. Host work, so compiled graphs call it eagerly (a graph break; the
        pre-hook's :meth:`prepare` avoids it)."""
        static = layout.without_valid()
        base = _bounded_get(self._shared.patterns, (static, device), self._pattern_cache_size,
                            lambda: self.pattern(static, None, None).to(device))
        lengths = layout.key_lengths()
        if lengths is None:
            return base
        return _bounded_get(self._shared.masked, (layout, device), self._pattern_cache_size,
                            lambda: base.with_kv_lens(torch.tensor(lengths, device=device)))

    def prepare(self, context: StepContext, device: torch.device, pattern: bool = True) -> None:
        """Host-side facts for the transformer call about to run (called by the pre-hook, outside any graph): the
        step's dense reason and, with ``pattern``, the static pattern of the context's layout."""
        context.step_reason = self.step_reason(context)
        layout = context.layout
        if not pattern or layout is None or not self.uses_pattern or not self.static_pattern:
            return
        prepared = self._shared.prepared
        if prepared is None or prepared[0] is not layout or prepared[1] != device:
            self._shared.prepared = (layout, device, self._static_pattern(layout, device))

    def cached_rope_layout(self, rotary_emb: Any, seq_len: int, read_back) -> Optional[TokenLayout]:
        """``read_back(rotary_emb, seq_len)``, computed once per rotary table (all layers of a forward share it);
        ``None`` without reading for methods that never use a pattern (so a compiled dense processor has no graph
        break here). See :meth:`_read_rope_layout`."""
        if not self.uses_pattern:
            return None
        return self._read_rope_layout(rotary_emb, seq_len, read_back)

    @torch.compiler.disable
    def _read_rope_layout(self, rotary_emb: Any, seq_len: int, read_back) -> Optional[TokenLayout]:
        """The read-back behind :meth:`cached_rope_layout`: host work on the table's values, so compiled graphs
        break here (full-graph compilation needs the layout from the pre-hook: ``vidattn.apply``).

        The read-back runs under ``torch.no_grad`` on detached tables: a rotary table that carries autograd history
        (Mochi's comes from the trainable ``pos_frequencies``) would otherwise make the read-back save tensors for
        backward on a cache miss only, so gradient checkpointing's recomputation (a cache hit) would save fewer
        tensors than the original forward (``CheckpointError``). Records why no layout came back, for the
        "no token layout" warning (:meth:`dense_reason`).
        """
        if rotary_emb is None:
            self._rope_status = "missing"
            return None
        table = rotary_emb[0] if isinstance(rotary_emb, (tuple, list)) else rotary_emb
        last, layout = self._shared.rope
        if last is not table:
            def detach(t: Any) -> Any:
                return t.detach() if isinstance(t, torch.Tensor) else t

            tables = tuple(map(detach, rotary_emb)) if isinstance(rotary_emb, (tuple, list)) else detach(rotary_emb)
            with torch.no_grad():
                layout = read_back(tables, seq_len)
            self._shared.rope = (table, layout)
        self._rope_status = "unreadable" if layout is None else "read"
        return layout

    # ------------------------------------------------------------------ policy
    def dense_reason(self, layout: Optional[TokenLayout]) -> Optional[str]:
        """Why this call runs dense (``None``: it runs sparse). Reads only facts fixed before the call (the layer's
        flag, the step context's reason), so compiled graphs specialise on them, not on the step. Calls without a
        token layout are logged once per processor at WARNING, naming the family, why and how to install the
        processor instead."""
        if layout is None:
            if "no-layout" not in self._shared.logged:
                self.log_once("no-layout", self._no_layout_message(), logging.WARNING)
            return "no token layout"
        if self.dense_layer:
            return "dense layer"
        ctx = self.context
        if ctx is None:
            if self.dense_steps or self.dense_last_steps:
                self.log_once("no-step", "vidattn: dense_steps/dense_last_steps need the step context; install "
                              "with vidattn.apply(pipe, processor) or pipe.set_attn_processor on a vidattn pipeline. "
                              "Running every step sparse.", logging.WARNING)
            if self.layer_index is None and self.dense_layers:
                self.log_once("no-layer", "vidattn: dense_layers needs per-layer processors (vidattn.apply); "
                              "a single shared instance runs every layer sparse.", logging.WARNING)
            return None
        return ctx.step_reason

    def _no_layout_message(self) -> str:
        from ..models import ADAPTERS

        adapter = self.adapter or next((a for a in ADAPTERS if a.name == self.family), None)
        return adapter.no_layout_message(self, getattr(self, "_rope_status", None)) if adapter else (
            "vidattn: no token layout for this call (no step context and no rotary embedding to read it "
            "from); running dense. Install the processor with vidattn.apply(pipe, processor).")

    def step_reason(self, ctx: StepContext) -> Optional[str]:
        """Why the step in ``ctx`` runs dense under this processor's knobs (``None``: sparse); host-side, once per
        transformer call (:meth:`prepare`)."""
        if ctx.training:  # per-sample timesteps, no denoising step: only dense_layers applies
            if self.dense_steps or self.dense_last_steps:
                self.log_once("training-steps", "vidattn: dense_steps/dense_last_steps count denoising steps; a "
                              "training call has per-sample timesteps and no step, so they are ignored there "
                              "(dense_layers still applies)", logging.WARNING)
            return None
        if ctx.step < 0:
            if self.dense_steps or self.dense_last_steps:
                self.log_once("no-step", "vidattn: dense_steps/dense_last_steps need the denoising step; this "
                              "transformer call passed no timestep. Running it sparse.", logging.WARNING)
            return None
        if ctx.step < self.dense_steps:
            return "dense step"
        if self.dense_last_steps:
            n = ctx.num_steps
            if n is None:
                self.log_once("no-num-steps", "vidattn: dense_last_steps needs the scheduler's number of steps; "
                              "not known here, ignoring it.", logging.WARNING)
            elif ctx.step >= n - self.dense_last_steps:
                return "dense last step"
        return None

    # ------------------------------------------------------------------ the attention op
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[TokenLayout],
               dense_fn) -> torch.Tensor:
        """Attention on BSHD q, k, v: ``dense_fn(q, k, v)`` (the stock path) or the sparse kernels.

        Statistics and CPU timings are recorded in eager mode; inside a compiled graph the call only computes.
        """
        reason = self.dense_reason(layout)
        shards = cp_degree(self._parallel_config)  # under context parallelism q, k, v are one of `shards` shards
        if reason is None and layout.seq_len != q.shape[1] * shards:
            reason = "sequence length does not match the token layout"
            self.log_once(f"len-{layout}-{q.shape[1]}", f"vidattn: layout {layout} has {layout.seq_len} tokens but "
                          f"attention got {q.shape[1]} x {shards} shard(s); running dense.", logging.WARNING)
        if torch.compiler.is_compiling():
            if reason is not None:
                return self._dense(dense_fn, q, k, v)
            if (self.static_pattern and self.token_order == layout.order and shards == 1
                    and type(self).plan is SparseAttentionProcessor.plan):
                return sparse_attention(q, k, v, self._pattern_for(layout, q, k), layout="bshd", backend=self.backend)
            return self._attend_planned(q, k, v, layout, dense_fn)[0]
        timed = q.device.type == "cpu"
        if timed and reason is None and self.backend in ("auto", "torch"):
            ensure_built()  # builds/loads the C++ CPU kernel once per process, before the timer starts
        start = time.perf_counter() if timed else 0.0
        if reason is not None:
            out = self._dense(dense_fn, q, k, v)
            self.stats.record(False, 1.0, time.perf_counter() - start if timed else 0.0, reason)
            return out
        out, plan = self._attend_planned(q, k, v, layout, dense_fn)
        seconds = time.perf_counter() - start if timed else 0.0
        if plan.dense:  # the method asked for full attention (FreeSwim's full branch)
            self.stats.record(False, 1.0, seconds, "method's full attention")
        else:
            self.stats.record(True, plan.density(), seconds)
        return out

    @torch.compiler.disable
    def _attend_planned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        dense_fn=None) -> tuple[torch.Tensor, AttentionPlan]:
        """One sparse call: on this process (:meth:`_attend_local`), or on local shards under diffusers' context
        parallelism (``_parallel_config``: :func:`vidattn.parallel.context_parallel_attention`)."""
        if self._parallel_config is not None:
            return context_parallel_attention(self, q, k, v, layout, dense_fn)
        return self._attend_local(q, k, v, layout, dense_fn)

    def _attend_local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      dense_fn=None) -> tuple[torch.Tensor, AttentionPlan]:
        """Plan and execute one sparse call on the whole sequence; when the layout is not in the method's token
        order, q, k, v are put in it here and the output back (eager: plans of dynamic methods are Python objects
        built per call). A dense plan runs ``dense_fn`` with the plan's scale."""
        order = None
        if layout.order != self.token_order:
            order = self._sequence_order(layout, q.device)
            q, k, v = (t.index_select(1, order[0]) for t in (q, k, v))
            layout = replace(layout, order=self.token_order)
        plan = self.plan(layout, q, k, v)
        if plan.dense:
            out = dense_fn(q, k, v, scale=plan.scale)
        else:
            out = execute_plan(plan, q, k, v, backend=self.backend)
        if order is not None:
            out = out.index_select(1, order[1])
        return out, plan

    def _sequence_order(self, layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if layout.order != "raster":
            raise ValueError(f"vidattn: {type(self).__name__} builds its plans in {self.token_order!r} order but the "
                             f"call's tokens are in {layout.order!r} order")
        self.log_once(f"order-{self.token_order}", f"vidattn: {self.family or 'this model'}: no split-point hooks put "
                      f"the tokens in {self.token_order!r} order for this call; permuting q, k, v in every attention "
                      "layer instead (correct, slower). vidattn.apply installs the hooks where the model has them.")
        key = (layout.without_valid(), self.token_order, device)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            perm, inverse = sequence_permutation(layout, self.token_order)
            return perm.to(device), inverse.to(device)
        return _bounded_get(self._shared.orders, key, 8, build)

    # ------------------------------------------------------------------ diffusers entry point
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb: Any = None,
                 image_rotary_emb: Any = None) -> Any:
        adapter = self.adapter
        if adapter is None:  # a shared instance set with set_attn_processor: find the family per module
            from ..models import adapter_for_module

            adapter = adapter_for_module(attn)
            if getattr(self, "_family", None) != adapter.name:
                self._family = adapter.name
        return adapter.process(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                               rotary_emb if rotary_emb is not None else image_rotary_emb)


class FullProcessor(SparseAttentionProcessor):
    """The all-ones pattern through the sparse path: dense attention computed by the sparse kernels (test probe).

    ``token_order`` runs it in another video token order (``"gilbert"``): a probe of the token-order machinery,
    since the all-ones pattern gives the same attention in any order."""

    method = "full"

    def __init__(self, *, block_size: int = 128, token_order: str = "raster", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not is_token_order(token_order):
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
        self.block_size = block_size
        self.token_order = token_order

    def knobs(self) -> dict:
        return {**super().knobs(), "block_size": self.block_size, "token_order": self.token_order}

    def pattern(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> BlockPattern:
        return BlockPattern.full(layout.seq_len, block_q=self.block_size)


class DenseProcessor(SparseAttentionProcessor):
    """Every call through the stock dense path, with vidattn's statistics (the ``dense`` baseline)."""

    method = "dense"
    uses_pattern = False

    def dense_reason(self, layout: Optional[TokenLayout]) -> Optional[str]:
        return "dense method"
