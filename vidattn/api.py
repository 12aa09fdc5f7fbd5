"""``vidattn.apply`` / ``vidattn.remove``: install a processor on a pipeline (or a transformer) and undo it."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .context import StepContext
from .models import ModelAdapter, adapter_for_transformer
from .processors.base import SparseAttentionProcessor

__all__ = ["apply", "remove", "installed", "Installation"]

_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, Installation]" = weakref.WeakKeyDictionary()


@dataclass
class Installation:
    """What :func:`apply` changed, so that :func:`remove` can restore it exactly."""

    processor: SparseAttentionProcessor
    context: StepContext
    stats: Any = None
    transformers: list = field(default_factory=list)
    originals: list = field(default_factory=list)  # (adapter, module, original processor)
    hooks: list = field(default_factory=list)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` (``OptimizedModule._orig_mod``), whose modules carry the processors."""
    return getattr(model, "_orig_mod", model)


def _transformers(target: Any) -> list[nn.Module]:
    if isinstance(target, nn.Module):
        return [_unwrap(target)]
    found = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
    found = [_unwrap(t) for t in found if t is not None]
    if not found:
        raise TypeError(f"vidattn.apply needs a diffusers pipeline with a transformer, or a transformer model; "
                        f"got {type(target).__name__}")
    return found


def _step_hook(adapter: ModelAdapter, context: StepContext):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        context.observe(adapter.timestep(args, kwargs), adapter.grid(module, args, kwargs))

    return hook


def apply(target: Any, processor: SparseAttentionProcessor) -> Installation:
    """Install ``processor`` on every self-attention layer of the pipeline's transformer(s).

    Each layer gets its own copy (with its layer index; stats and the pattern cache are shared, and start fresh at
    every ``apply``). ``torch.compile``d transformers are handled through their original module. A forward
    pre-hook on each transformer fills one :class:`StepContext` (shared by Wan 2.2's two experts). Applying again
    replaces the previous installation. Returns the :class:`Installation` (``.stats`` has the counters).
    """
    if not isinstance(processor, SparseAttentionProcessor):
        raise TypeError(f"processor must be a vidattn SparseAttentionProcessor, got {type(processor).__name__}")
    transformers = _transformers(target)
    for t in transformers:
        if t in _INSTALLED:
            remove(t)
    context = StepContext(pipeline=None if isinstance(target, nn.Module) else target)
    processor.reset_state()  # fresh stats and caches for this installation, shared by its per-layer copies
    inst = Installation(processor=processor, context=context, stats=processor.stats, transformers=transformers)
    try:
        for t in transformers:
            adapter = adapter_for_transformer(t)
            for layer, (_, module) in enumerate(adapter.self_attention_modules(t)):
                inst.originals.append((adapter, module, adapter.get_processor(module)))
                adapter.set_processor(module, processor.for_layer(layer, context, adapter))
            inst.hooks.append(t.register_forward_pre_hook(_step_hook(adapter, context), with_kwargs=True))
    except Exception:
        _undo(inst)
        raise
    for t in transformers:
        _INSTALLED[t] = inst
    processor.context = context
    return inst


def _undo(inst: Installation) -> None:
    for adapter, module, original in reversed(inst.originals):
        adapter.set_processor(module, original)
    for handle in inst.hooks:
        handle.remove()
    inst.originals.clear()
    inst.hooks.clear()
    inst.processor.context = None


def remove(target: Any) -> None:
    """Restore the processors that were there before :func:`apply` and remove its hooks (no-op if none)."""
    for t in _transformers(target):
        inst = _INSTALLED.pop(t, None)
        if inst is None:
            continue
        for other in inst.transformers:
            _INSTALLED.pop(other, None)
        _undo(inst)


def installed(target: Any) -> Optional[Installation]:
    """The current installation on the pipeline's (first) transformer, if any."""
    return _INSTALLED.get(_transformers(target)[0])
