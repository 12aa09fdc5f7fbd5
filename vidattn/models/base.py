"""ModelAdapter: what vidattn must know about one transformer family."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..layout import TokenLayout
from ..parallel import joint_ring_dense, ring_needs_gather
from ..token_order import SplitPoints

__all__ = ["ModelAdapter"]


class ModelAdapter:
    """One transformer family (Wan, HunyuanVideo, ...). Subclasses set the class names and implement the hooks.

    * ``self_attention_modules`` — the modules to replace, in layer order;
    * ``grid`` — the latent token grid ``(T, H, W)`` after patching, from the transformer's forward inputs;
    * ``layout`` — the call's :class:`TokenLayout` from that grid and the call (text tokens, masks), or read back
      from the rotary embedding when no step context exists;
    * ``process`` — the stock processor's computation with the attention op replaced by ``processor.attend``.
    """

    name: str = ""
    #: the family's name in messages and the class of its drop-in pipeline in ``vidattn.pipelines`` ("" if none)
    title: str = ""
    pipeline_class: str = ""
    #: why a processor without step context may get no layout from this family's rotary embedding, by
    #: :meth:`SparseAttentionProcessor.cached_rope_layout` status ("missing": none passed, "unreadable": refused)
    rope_caveats: dict[str, str] = {}
    timestep_position: int = 1
    transformer_classes: tuple[str, ...] = ()
    attention_classes: tuple[str, ...] = ()

    def matches_transformer(self, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in self.transformer_classes

    def matches_module(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.attention_classes

    #: ``(block container, attention attribute)`` for the common one-list layout; adapters with another
    #: layout override :meth:`self_attention_modules`.
    self_attention_path: tuple[str, str] = ("transformer_blocks", "attn1")

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        container, attr = self.self_attention_path
        return [(f"{container}.{i}.{attr}", getattr(block, attr))
                for i, block in enumerate(getattr(transformer, container))]

    #: ``(block container, attention attribute)`` of the text cross-attention modules (``None``: the family has
    #: none — joint attention); used by methods that act on cross-attention too (FreeSwim's override)
    cross_attention_path: Optional[tuple[str, str]] = None

    def cross_attention_modules(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.cross_attention_path is None:
            return []
        container, attr = self.cross_attention_path
        return [(f"{container}.{i}.{attr}", getattr(block, attr))
                for i, block in enumerate(getattr(transformer, container))]

    def stock_cross_processor(self, processor: Any) -> Any:
        """The stock diffusers processor of this family's cross-attention modules (with ``processor``'s backend)."""
        return self._stock(processor)

    def get_processor(self, module: nn.Module) -> Any:
        return module.get_processor() if hasattr(module, "get_processor") else module.processor

    def set_processor(self, module: nn.Module, processor: Any) -> None:
        """Install ``processor`` on ``module``; under diffusers' context parallelism (``enable_parallelism`` gave the
        module's processor a ``_parallel_config``) the new processor takes that config over, so vidattn can be
        applied (or removed) before or after parallelism is enabled."""
        config = getattr(self.get_processor(module), "_parallel_config", None)
        if config is not None and hasattr(processor, "_parallel_config") and processor._parallel_config is None:
            processor._parallel_config = config
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The ``timestep`` forward argument (keyword, or positional at ``timestep_position``)."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[self.timestep_position] if len(args) > self.timestep_position else None

    def process(self, processor, attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                rotary_emb: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def stock_processor(stock_cls: type, processor) -> Any:
        """A diffusers processor for calls vidattn leaves stock, with the vidattn processor's backend and CP config."""
        stock = stock_cls()
        stock._attention_backend = processor._attention_backend
        stock._parallel_config = processor._parallel_config
        return stock

    @staticmethod
    def dispatcher_dense(processor, attention_mask: Optional[torch.Tensor]):
        """The stock dense op: diffusers' ``dispatch_attention_fn`` with the processor's backend and CP config
        (``scale``: a method's own softmax scale; ``None`` is the stock ``D**-0.5``). Under ring attention with a
        backend that returns no log-sum-exp (``native``) the keys are gathered instead (``ring_needs_gather``)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if ring_needs_gather(processor._parallel_config, processor._attention_backend):
            def gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: Optional[float] = None) -> torch.Tensor:
                return joint_ring_dense(q, k, v, attention_mask, processor._parallel_config,
                                        processor._attention_backend, scale)
            return gathered

        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
            if scale is None:  # the stock call, argument for argument
                return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                             backend=processor._attention_backend,
                                             parallel_config=processor._parallel_config)
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         scale=scale, backend=processor._attention_backend,
                                         parallel_config=processor._parallel_config)

        return dense

    @staticmethod
    def head_projections(attn: nn.Module, x: torch.Tensor, added: bool = False):
        """q, k, v of ``x`` split into heads (BSHD), with the q/k norms: the main stream's ``to_*`` + ``norm_*``,
        or with ``added`` a dual-stream block's text stream ``add_*_proj`` + ``norm_added_*``."""
        if added:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            norms = (attn.norm_added_q, attn.norm_added_k)
        else:
            projections = (attn.to_q, attn.to_k, attn.to_v)
            norms = (attn.norm_q, attn.norm_k)
        query, key, value = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
        if norms[0] is not None:
            query = norms[0](query)
        if norms[1] is not None:
            key = norms[1](key)
        return query, key, value

    def no_layout_message(self, processor, rope_status: Optional[str]) -> str:
        """The once-per-processor warning for calls that run dense because no token layout is known: which family,
        why, and how to install the processor so that the grid comes from the transformer's inputs."""
        title = self.title or self.name or "this model"
        ctx = processor.context
        if ctx is not None and ctx.grid is not None:
            return (f"vidattn: {title} attention: this call's attention mask cannot be expressed as a token layout; "
                    f"such calls run dense (dense reason 'no token layout' in the processor's stats).")
        if rope_status == "missing":
            why = "the attention call got no rotary embedding to read the token grid from"
        elif rope_status == "unreadable":
            why = "its rotary embedding does not determine the token grid"
        else:
            why = "this call's attention mask cannot be expressed as a token layout"
        caveat = self.rope_caveats.get(rope_status or "")
        if caveat:
            why += f" ({caveat})"
        if ctx is None:
            pipeline = f"vidattn.pipelines.{self.pipeline_class}" if self.pipeline_class else \
                "a vidattn.pipelines drop-in pipeline"
            return (f"vidattn: {title} attention: {why}, and a processor installed with set_attn_processor (or "
                    f"assigned to .processor) sees only the attention module, not the transformer's inputs. These "
                    f"calls run dense (dense reason 'no token layout' in the processor's stats). Install it with "
                    f"vidattn.apply(pipe, processor), or load the pipeline as {pipeline} and call "
                    f"pipe.set_attn_processor(processor).")
        return (f"vidattn: {title} attention: the transformer's forward inputs gave no token grid and {why}; these "
                f"calls run dense (dense reason 'no token layout' in the processor's stats).")

    #: where a forward can be put into another token order and back (diffusers' context-parallel split points);
    #: ``None``: processors that want another order permute q, k, v per layer instead
    split_points: Optional[SplitPoints] = None

    def supports_token_order(self, transformer: nn.Module) -> bool:
        """Whether :attr:`split_points` may reorder this transformer's tokens (a model whose blocks slice tokens by
        raster position, e.g. HunyuanVideo I2V's token replacement of the first frame, may not)."""
        return self.split_points is not None

    #: whether self-attention runs on :meth:`call_layout`'s whole sequence, so that the pre-hook can prepare its
    #: pattern (Mochi: no, it attends per sample on the video and that sample's valid text)
    attends_call_layout: bool = True

    def call_layout(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Optional[TokenLayout]:
        """The self-attention layout of this transformer call, from its forward inputs (host-side, in the pre-hook):
        the latent grid, plus the joint text segment in families that have one."""
        grid = self.grid(transformer, args, kwargs)
        return None if grid is None else TokenLayout(*grid)

    def context_layout(self, processor) -> Optional[TokenLayout]:
        """The layout the pre-hook prepared for this call (:meth:`call_layout`), if the processor has a context."""
        ctx = processor.context
        return None if ctx is None else ctx.layout
