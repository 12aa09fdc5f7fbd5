"""``vidattn.apply`` / ``vidattn.remove``: install a processor on a pipeline (or a transformer) and undo it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .context import StepContext
from .models import ModelAdapter, adapter_for_transformer
from .processors.base import SparseAttentionProcessor
from .token_order import OrderHooks

__all__ = ["apply", "remove", "installed", "Installation", "StepHook"]

_ATTR = "_vidattn_installation"  # on each transformer: its _TransformerChanges (a plain attribute, not state_dict)


class StepHook:
    """The forward pre-hook :func:`apply` registers: prepares each transformer call, outside any compiled graph.

    It records the step (:class:`StepContext`), the call's token layout (the adapter's ``call_layout``) and, with
    ``processor`` (one of the installed per-layer copies: they share knobs and caches), the step's dense reason and
    the static pattern. Processors then read only these host-side facts, so ``torch.compile(fullgraph=True)`` and
    diffusers' regional compilation capture the transformer without tracing any of it. A plain object (not a
    closure), so it pickles and deep-copies with the transformer; a deep copy's hook fills the copy's context.
    """

    def __init__(self, adapter: ModelAdapter, context: StepContext,
                 processor: Optional[SparseAttentionProcessor] = None, order: str = "raster") -> None:
        self.adapter = adapter
        self.context = context
        self.processor = processor
        self.order = order  # the token order the split-point hooks put this transformer's forward in

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        adapter, ctx = self.adapter, self.context
        exporting = torch.compiler.is_exporting()  # tensors are fake: no step to read, the program is one call
        ctx.observe(None if exporting else adapter.timestep(args, kwargs), adapter.grid(module, args, kwargs),
                    training=module.training and torch.is_grad_enabled())
        layout = adapter.call_layout(module, args, kwargs)
        if layout is not None and self.order != layout.order:
            layout = dataclasses.replace(layout, order=self.order)
        ctx.set_layout(layout)
        if self.processor is not None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
            self.processor.prepare(ctx, device, pattern=adapter.attends_call_layout)


@dataclass(eq=False)
class Installation:
    """What :func:`apply` changed, so that :func:`remove` can restore it exactly.

    Each transformer holds its own part (:class:`_TransformerChanges`), so a pickled or deep-copied transformer
    carries its installation (and not the other expert of a Wan 2.2 pipeline). An ``Installation`` pickled or
    copied on its own has no transformers.
    """

    processor: SparseAttentionProcessor
    context: StepContext
    stats: Any = None
    parts: list[_TransformerChanges] = field(default_factory=list, repr=False)  # one per transformer

    @property
    def transformers(self) -> list[nn.Module]:
        return [part.transformer for part in self.parts]

    @property
    def originals(self) -> list:
        """``(adapter, module, original processor)`` for every replaced processor."""
        return [entry for part in self.parts for entry in part.originals]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "parts": []}  # rebuilt by the parts that are pickled or copied


@dataclass(eq=False)
class _TransformerChanges:
    """What :func:`apply` changed on one transformer: the replaced processors and the id of its :class:`StepHook`.

    Hooks are removed by id (a ``RemovableHandle`` keeps a weak reference to the original's hook dict, so it would
    not act on a copy).
    """

    installation: Installation = field(repr=False)
    transformer: nn.Module = field(repr=False)
    originals: list = field(default_factory=list)  # (adapter, module, original processor)
    hook_id: Optional[int] = None
    order_hooks: Optional[OrderHooks] = None  # split-point hooks of a method that wants another token order

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: join the copied installation
        self.__dict__.update(state)
        self.installation.parts.append(self)
        ids = [self.hook_id] if self.hook_id is not None else []
        ids += [hook_id for _, _, hook_id in (self.order_hooks.handles if self.order_hooks else ())]
        if ids:  # in a new process torch counts hook ids from 0: never hand ours out again
            RemovableHandle.next_id = max(RemovableHandle.next_id, max(ids) + 1)

    def undo(self) -> None:
        for adapter, module, original in reversed(self.originals):
            adapter.set_processor(module, original)
        self.originals.clear()
        t = self.transformer
        if self.order_hooks is not None:
            self.order_hooks.remove(t)
            self.order_hooks = None
        hook = t._forward_pre_hooks.get(self.hook_id)
        if isinstance(hook, StepHook) and hook.context is self.installation.context:
            t._forward_pre_hooks.pop(self.hook_id, None)
            t._forward_pre_hooks_with_kwargs.pop(self.hook_id, None)
        self.hook_id = None
        if vars(t).get(_ATTR) is self:
            del vars(t)[_ATTR]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` (``OptimizedModule._orig_mod``) and DDP / ``DataParallel`` (``.module``)
    wrappers, in any nesting: its modules carry the processors."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _transformers(target: Any) -> list[nn.Module]:
    if isinstance(target, nn.Module):
        return [_unwrap(target)]
    found = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
    found = [_unwrap(t) for t in found if t is not None]
    if not found:
        raise TypeError(f"vidattn.apply needs a diffusers pipeline with a transformer, or a transformer model; "
                        f"got {type(target).__name__}")
    return found


def apply(target: Any, processor: SparseAttentionProcessor) -> Installation:
    """Install ``processor`` on every self-attention layer of the pipeline's transformer(s).

    Each layer gets its own copy (with its layer index; stats and the pattern cache are shared, and start fresh at
    every ``apply``). ``torch.compile``d transformers are handled through their original module. A forward
    pre-hook on each transformer fills one :class:`StepContext` (shared by Wan 2.2's two experts). A processor
    whose plans want another token order (``processor.token_order``) also gets :class:`~vidattn.token_order.OrderHooks`
    at the model's split points, so the whole forward runs in that order. Applying again
    replaces the previous installation. Returns the :class:`Installation` (``.stats`` has the counters).
    """
    if not isinstance(processor, SparseAttentionProcessor):
        raise TypeError(f"processor must be a vidattn SparseAttentionProcessor, got {type(processor).__name__}")
    transformers = _transformers(target)
    for t in transformers:
        remove(t)
    context = StepContext(pipeline=None if isinstance(target, nn.Module) else target)
    processor.reset_state()  # fresh stats and caches for this installation, shared by its per-layer copies
    inst = Installation(processor=processor, context=context, stats=processor.stats)
    cross_layers = 0
    try:
        for t in transformers:
            part = _TransformerChanges(inst, t)
            inst.parts.append(part)
            adapter = adapter_for_transformer(t)
            first = None
            for layer, (_, module) in enumerate(adapter.self_attention_modules(t)):
                part.originals.append((adapter, module, adapter.get_processor(module)))
                copy = processor.for_layer(layer, context, adapter)
                first = first or copy
                adapter.set_processor(module, copy)
            order = processor.token_order if adapter.supports_token_order(t) else "raster"
            cross_layers += _install_cross(part, adapter, t, processor, context, cross_layers)
            hook = StepHook(adapter, context, first, order)
            part.hook_id = t.register_forward_pre_hook(hook, with_kwargs=True).id
            if order != "raster":  # after the step hook, which sets the call's layout (and so its order)
                part.order_hooks = OrderHooks(context, adapter.split_points)
                part.order_hooks.install(t)
    except Exception:
        _undo(inst)
        raise
    for part in inst.parts:
        setattr(part.transformer, _ATTR, part)
    processor.context = context
    return inst


def _install_cross(part: _TransformerChanges, adapter: ModelAdapter, transformer: nn.Module,
                   processor: SparseAttentionProcessor, context: StepContext, first_layer: int) -> int:
    """Per-layer copies of the method's cross-attention processor (``processor.cross_processor()``, e.g. FreeSwim's
    record/replay) on the family's cross-attention modules, numbered from ``first_layer`` (so Wan 2.2's two experts
    never share a layer index); recorded for exact restore. Returns the number of modules."""
    make = getattr(processor, "cross_processor", None)
    if make is None:
        return 0
    modules = adapter.cross_attention_modules(transformer)
    if not modules:
        processor.log_once("no-cross", f"vidattn: {adapter.title or adapter.name} has no separate cross-attention; "
                           f"{type(processor).__name__}'s cross-attention roles do not apply there")
        return 0
    cross = make()
    for layer, (_, module) in enumerate(modules):
        part.originals.append((adapter, module, adapter.get_processor(module)))
        adapter.set_processor(module, cross.for_layer(first_layer + layer, context, adapter))
    return len(modules)


def _undo(inst: Installation) -> None:
    for part in reversed(inst.parts):  # parts stay listed (``transformers``); their changes are emptied
        part.undo()
    inst.processor.context = None


def remove(target: Any) -> None:
    """Restore the processors that were there before :func:`apply` and remove its hooks (no-op if none).

    Works on pickled and deep-copied transformers and pipelines too, touching only the copy.
    """
    for t in _transformers(target):
        inst = installed(t)
        if inst is not None:
            _undo(inst)


def installed(target: Any) -> Optional[Installation]:
    """The current installation on the pipeline's (first) transformer, if any."""
    part = vars(_transformers(target)[0]).get(_ATTR)
    return None if part is None else part.installation
