"""Context parallelism for vidattn's sparse methods, run inside diffusers' own engine (spec ``diffusers.md`` §6).

diffusers (>= 0.36) splits a transformer's token sequence across ranks with hooks from the model's ``_cp_plan``
(``transformer.enable_parallelism(config=ContextParallelConfig(...))``) and sets ``_parallel_config`` on every
attention processor; each processor then sees its **local shard** of the sequence. vidattn's processors build their
plans from the **global** layout (the step context's grid, never the local shapes) and run:

* **Ulysses** (``ulysses_degree=N``) — diffusers' ``TemplatedUlyssesAttention`` does both all-to-alls; vidattn only
  hands it the sparse op as its ``forward_op`` (:class:`_SparseOp`). The op sees the whole sequence for ``H/N``
  heads: head-shared static patterns (Radial, the FreeSwim window) and per-head dynamic selection (Rectified, on the
  local heads) give the single-process result.
* **Ring** (``ring_degree=N``) — diffusers' ring template runs the backend's op on every (query shard, key shard)
  pair without telling the op which pair it is on, so it cannot skip blocks; :func:`ring_attention` is vidattn's
  own loop: K/V shards are gathered as diffusers does (``rotate_method="allgather"``), each pair computes only the
  blocks the global pattern lists for it (:func:`shard_pattern`; empty pairs are skipped), partial results merge
  with the kernels' log-sum-exp (:func:`merge_partial`, safe for rows that see nothing yet). Static patterns only:
  Rectified's selection needs every query and key block of the sequence (clear error: use Ulysses). Inference
  only (no gradient through the K/V gather).
* **Both degrees > 1** — diffusers' all-to-all inside the Ulysses group, then the ring loop over the ring group.

Joint text (HunyuanVideo: ``[video | text]`` in one attention): diffusers 0.42 gives the model no ``_cp_plan``;
vidattn supplies one (``HunyuanVideoAdapter.cp_plan``, through :func:`model_cp_plan`), which splits both streams
the way diffusers' own plans for joint models (Flux, QwenImage) do, so each rank holds ``[video chunk r | text
chunk r]``. The gathered sequence ``[v0 t0 v1 t1 ...]`` is put back in ``[video | text]`` order for the pattern
(:func:`joint_order`); each rank's part of the model's key mask is :func:`joint_shard_mask`. Ring with joint text
gathers the K/V chunks and the text queries, computes its video rows and all text rows over the whole sequence
(:func:`row_pattern`) and keeps its text chunk (text rows: whole blocks need not align with the text chunks). Dense
calls under ring with a key mask go through :func:`joint_ring_dense` (diffusers' ring template applies one mask
to every key shard). Ulysses x Ring with joint text: a clear error.

Token order: a method's order (Gilbert curve, spatial tiles) is applied **before** the split — vidattn's split-point
hooks permute the full sequence ahead of diffusers' split hooks (``token_order.OrderHooks``), so each rank holds a
contiguous shard of the permuted sequence and Ulysses gathers it in the method's order.

Device lookup workaround: diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` when it resolves the
config, a division by zero on a machine without an accelerator; :func:`enable_context_parallel` answers that one
lookup with 1 (device "cpu", gloo) for the duration of the call, and only when no accelerator exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .kernels import BlockPattern, sparse_attention
from .kernels.predicates import ShiftedPredicate
from .layout import TokenLayout
from .plan import AttentionPlan

__all__ = ["CP_KINDS", "ShiftedPredicate", "context_parallel_attention", "cp_degree", "enable_context_parallel",
           "joint_order", "joint_ring_dense", "ring_needs_gather", "joint_shard_mask", "merge_partial", "model_cp_plan", "parse_cp",
           "ring_attention", "row_pattern", "shard_pattern"]

CP_KINDS = ("ulysses", "ring")


# ------------------------------------------------------------------------------------------------ configuration
def parse_cp(spec: str) -> tuple[str, int]:
    """``"ulysses:N"`` / ``"ring:N"`` (N >= 2) -> ``(kind, N)``; ValueError naming the accepted forms otherwise."""
    match = re.fullmatch(rf"({'|'.join(CP_KINDS)}):(\d+)", str(spec).strip())
    if match is None or int(match.group(2)) < 2:
        raise ValueError(f"expected ulysses:N or ring:N with N >= 2, got {spec!r}")
    return match.group(1), int(match.group(2))


def _cp_config(parallel_config: Any) -> Any:
    return getattr(parallel_config, "context_parallel_config", None)


def cp_degree(parallel_config: Any) -> int:
    """Number of sequence shards under ``parallel_config`` (diffusers' ``ParallelConfig``; 1 without CP)."""
    cfg = _cp_config(parallel_config)
    return 1 if cfg is None else cfg.ring_degree * cfg.ulysses_degree


def _make_config(spec: Any) -> Any:
    from diffusers import ContextParallelConfig

    if isinstance(spec, str):
        kind, n = parse_cp(spec)
        return ContextParallelConfig(**{f"{kind}_degree": n})
    if isinstance(spec, ContextParallelConfig):
        return spec
    raise TypeError(f"expected a ContextParallelConfig or 'ulysses:N' / 'ring:N', got {type(spec).__name__}")


@contextlib.contextmanager
def _cpu_device_lookup() -> Iterator[None]:
    """The device-lookup workaround (see the module docstring): ``torch.accelerator.device_count()`` answers 1
    inside the block when no accelerator exists, restored on exit; untouched where an accelerator exists."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _group_mesh(cfg: Any) -> Any:
    """A ("ring", "ulysses") device mesh over this rank's CP group when the world holds several CP groups (ranks
    ``g*n .. g*n+n-1`` form group ``g``; prompts are sharded across groups), else ``None`` (diffusers' own)."""
    n = cfg.ring_degree * cfg.ulysses_degree
    world = dist.get_world_size()
    if world == n:
        return None
    if world % n:
        raise ValueError(f"the world size {world} is not a multiple of the context-parallel degree {n}")
    device = torch._C._get_accelerator().type
    mesh = dist.device_mesh.init_device_mesh(device, (world // n, cfg.ring_degree, cfg.ulysses_degree),
                                             mesh_dim_names=("group", "ring", "ulysses"))
    return mesh["ring", "ulysses"]


def _check_heads(transformer: torch.nn.Module, cfg: Any) -> None:
    heads = getattr(transformer.config, "num_attention_heads", None)
    if heads is not None and cfg.ulysses_degree > 1 and heads % cfg.ulysses_degree:
        raise ValueError(f"ulysses degree {cfg.ulysses_degree} does not divide the model's {heads} attention heads "
                         f"(each rank takes heads/N heads); choose a divisor of {heads}")


def model_cp_plan(transformer: Any) -> Optional[dict]:
    """The transformer's (class or instance) context-parallel plan: the class's own ``_cp_plan``, else the one its
    vidattn adapter supplies (``cp_plan``: HunyuanVideo), else ``None``. An instance is also checked against
    configurations the plan cannot split (ValueError)."""
    cls = transformer if isinstance(transformer, type) else type(transformer)
    plan = getattr(cls, "_cp_plan", None)
    if plan is not None:
        return plan
    from .models import ADAPTERS

    for adapter in ADAPTERS:
        if cls.__name__ in adapter.transformer_classes and hasattr(adapter, "cp_plan"):
            return adapter.cp_plan(None if isinstance(transformer, type) else transformer)
    return None


def enable_context_parallel(target: Any, spec: Any) -> list[Any]:
    """diffusers' context parallelism on the pipeline's transformer(s) (or a transformer) with the model's
    ``_cp_plan`` (or vidattn's, :func:`model_cp_plan`): ``spec`` is a ``ContextParallelConfig`` or
    ``"ulysses:N"`` / ``"ring:N"``. Needs ``torch.distributed`` initialised (``torchrun``); with more processes than
    N, consecutive ranks form CP groups (group ``rank // N``). Works before or after :func:`vidattn.apply`. Returns
    each transformer's config."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised: launch with torchrun (or "
                           "accelerate launch) and call torch.distributed.init_process_group first")
    transformers = [target] if isinstance(target, torch.nn.Module) else [
        t for t in (getattr(target, "transformer", None), getattr(target, "transformer_2", None)) if t is not None]
    configs = []
    for t in transformers:
        t = getattr(t, "_orig_mod", t)
        plan = model_cp_plan(t)
        if plan is None:
            raise ValueError(f"{type(t).__name__} declares no _cp_plan in this diffusers version and vidattn has none "
                             "for it, so its sequence cannot be split; context parallelism is available for Wan, "
                             "HunyuanVideo (and other models with a _cp_plan)")
        cfg = dataclasses.replace(_make_config(spec))  # one config (and mesh) per transformer
        _check_heads(t, cfg)
        split_text = any("encoder_hidden_states" in v for v in plan.values() if isinstance(v, dict))
        if split_text and cfg.ring_degree > 1 and cfg.ulysses_degree > 1:
            raise ValueError(f"{type(t).__name__} joins its text to the video in attention; vidattn splits such a "
                             "sequence with Ulysses or Ring, not both: use ulysses:N or ring:N")
        cfg.mesh = cfg.mesh or _group_mesh(cfg)
        with _cpu_device_lookup():
            t.enable_parallelism(config=cfg, cp_plan=plan)
        t.register_forward_pre_hook(_SequenceCheck(cfg.ring_degree * cfg.ulysses_degree, split_text),
                                    with_kwargs=True)
        configs.append(cfg)
    return configs


def _patches(config: Any) -> Optional[tuple[int, int, int]]:
    """(t, h, w) patch of a transformer config: Wan's ``patch_size`` triple, or HunyuanVideo's ``patch_size_t`` and
    square ``patch_size``."""
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        return tuple(patch)
    if isinstance(patch, int) and isinstance(getattr(config, "patch_size_t", None), int):
        return config.patch_size_t, patch, patch
    return None


class _SequenceCheck:
    """Transformer pre-hook: the video token count (and, where the plan splits it, the joint text of HunyuanVideo)
    must split into N equal shards (diffusers would assert)."""

    def __init__(self, n: int, split_text: bool = False) -> None:
        self.n, self.split_text = n, split_text

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        patch = _patches(module.config)
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or patch is None:
            return
        tokens = (x.shape[2] // patch[0]) * (x.shape[3] // patch[1]) * (x.shape[4] // patch[2])
        if tokens % self.n:
            raise ValueError(f"context parallelism over {self.n} ranks needs a token count divisible by {self.n}; "
                             f"this call has {tokens} video tokens (change the frame count or size)")
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if self.split_text and isinstance(text, torch.Tensor) and text.shape[1] % self.n:
            raise ValueError(f"context parallelism over {self.n} ranks splits the text too: {text.shape[1]} text "
                             f"tokens do not divide by {self.n} (pad the prompt embeddings to a multiple)")


# ------------------------------------------------------------------------------------------------ ring math
def _check_whole_blocks(pattern: BlockPattern, shard_len: int) -> None:
    bad = next((b for b in (pattern.block_q, pattern.block_kv) if shard_len % b), None)
    if bad is not None:
        raise ValueError(f"ring attention needs shards of whole blocks: {shard_len} tokens per rank is not a "
                         f"multiple of the block size {bad}; change the block size or the video size")


def _sub_pattern(pattern: BlockPattern, q: tuple[int, int], kv: tuple[int, int]) -> Optional[BlockPattern]:
    """The part of ``pattern`` between query tokens ``q = (start, length)`` and keys ``kv = (start, length)``
    (starts on block boundaries; a range may end with the pattern's last, partial block). ``None`` when it lists no
    block or masks every key."""
    bq, bk = pattern.block_q, pattern.block_kv
    rows = slice(q[0] // bq, -(-(q[0] + q[1]) // bq))
    cols = slice(kv[0] // bk, -(-(kv[0] + kv[1]) // bk))
    mask = pattern.memo(("bitmap",), pattern.block_bitmap)[..., rows, cols]
    kv_lens = None
    if pattern.kv_lens is not None:
        kv_lens = (pattern.kv_lens.long() - kv[0]).clamp(0, kv[1])
        if not bool(kv_lens.any()):
            return None
    if not bool(mask.any()):
        return None
    partial = predicate = None
    if pattern.partial is not None:
        partial = pattern.memo(("partial-bitmap",), pattern.partial_bitmap)[..., rows, cols]
        predicate = ShiftedPredicate(pattern.predicate, q[0], kv[0])
    return BlockPattern.from_block_mask(mask, q_len=q[1], kv_len=kv[1], block_q=bq, block_kv=bk, partial=partial,
                                        predicate=predicate, kv_lens=kv_lens)


def shard_pattern(pattern: BlockPattern, q_shard: int, kv_shard: int, shard_len: int) -> Optional[BlockPattern]:
    """The part of a global ``pattern`` between query shard ``q_shard`` and key shard ``kv_shard`` of
    ``shard_len`` tokens each (``None`` when it lists no block or masks every key). Shards must be whole blocks.
    Memoised on the pattern."""
    _check_whole_blocks(pattern, shard_len)
    build = lambda: _sub_pattern(pattern, (q_shard * shard_len, shard_len),  # noqa: E731
                                 (kv_shard * shard_len, shard_len))
    return pattern.memo(("cp-shard", q_shard, kv_shard, shard_len), build, structural=False)


def row_pattern(pattern: BlockPattern, start: int, length: int) -> Optional[BlockPattern]:
    """Query rows ``start .. start + length`` of ``pattern`` over all its keys (``start`` on a block boundary;
    ``None`` when empty). Memoised on the pattern."""
    if start % pattern.block_q:
        raise ValueError(f"row {start} is not on a block boundary (block size {pattern.block_q})")
    build = lambda: _sub_pattern(pattern, (start, length), (0, pattern.kv_len))  # noqa: E731
    return pattern.memo(("cp-rows", start, length), build, structural=False)


def merge_partial(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], part: torch.Tensor,
                  part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax results over disjoint key sets: outputs ``(B, S, H, D)``, natural-log LSE ``(B, H, S)``
    (``-inf``: the row saw no key; its output is 0). Returns fp32 ``(out, lse)``; ``out=None`` starts the merge."""
    part, part_lse = part.float(), part_lse.float()
    if out is None:
        return part, part_lse
    m = torch.maximum(lse, part_lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that saw nothing on either side
    wa, wb = torch.exp(lse - m), torch.exp(part_lse - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    to_bshd = lambda w: (w / safe).transpose(1, 2).unsqueeze(-1)  # noqa: E731
    return out * to_bshd(wa) + part * to_bshd(wb), m + torch.log(total)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *, group: Any = None,
                   scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Sparse attention of this rank's query shard over the whole sequence (see the module docstring).

    ``q, k, v``: BSHD shard ``rank`` of ``group`` (the sequence cut into equal contiguous shards, rank order);
    ``pattern``: the global pattern (``q_len`` = shard length x group size). Returns this shard's output.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = q.shape[1]
    if pattern.q_len != n * world or pattern.kv_len != n * world:
        raise ValueError(f"the pattern covers {pattern.q_len} x {pattern.kv_len} tokens but {world} shards of {n} "
                         f"make {n * world}")
    _check_whole_blocks(pattern, n)  # before any collective, so every rank fails alike
    if q.requires_grad or k.requires_grad or v.requires_grad:
        raise NotImplementedError("vidattn ring attention is inference-only (no gradient through the K/V gather); "
                                  "train with ulysses context parallelism")
    kv = torch.stack((k, v)).contiguous()
    shards = [torch.empty_like(kv) for _ in range(world)]
    dist.all_gather(shards, kv, group=group)
    out = lse = None
    for step in range(world):
        src = (rank - step) % world  # the order of a rotating ring: own shard first
        sub = shard_pattern(pattern, rank, src, n)
        if sub is None:
            continue
        part, part_lse = sparse_attention(q, shards[src][0], shards[src][1], sub, scale=scale, return_lse=True,
                                          layout="bshd", backend=backend)
        out, lse = merge_partial(out, lse, part, part_lse)
    return torch.zeros_like(q) if out is None else out.to(q.dtype)


# ------------------------------------------------------------------------------------------------ joint text
def _joint(layout: TokenLayout, n: int) -> Optional[tuple[int, int]]:
    """``(video, text)`` tokens per rank when ``layout`` joins text to the video (each of the ``n`` ranks holds
    ``[video chunk | text chunk]``), else ``None``."""
    if layout.text is None or layout.text_tokens == 0:
        return None
    if layout.text.position != "last":
        raise ValueError("vidattn context parallelism splits joint sequences with the text last (HunyuanVideo); "
                         "this model puts it first")
    return layout.video_tokens // n, layout.text_tokens // n


def joint_order(n: int, video: int, text: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)``: ``x.index_select(1, perm)`` puts the gathered chunks ``[v0 t0 v1 t1 ...]`` of ``n``
    ranks (``video`` + ``text`` tokens each) in ``[video | text]`` order; ``inverse`` undoes it."""
    starts = torch.arange(n, device=device)[:, None] * (video + text)
    perm = torch.cat(((starts + torch.arange(video, device=device)).flatten(),
                      (starts + video + torch.arange(text, device=device)).flatten()))
    return perm, torch.argsort(perm)


def joint_shard_mask(mask: Optional[torch.Tensor], parallel_config: Any, video: int,
                     text: int) -> Optional[torch.Tensor]:
    """This rank's part ``[video chunk | text chunk]`` of a key mask ``(..., S + T)`` built for the whole joint
    sequence (HunyuanVideo builds it before the split), given the local ``video`` and ``text`` lengths. ``None``,
    a mask already local, or no context parallelism: returned as is."""
    cfg = _cp_config(parallel_config)
    if mask is None or cfg is None:
        return mask
    mesh = cfg._flattened_mesh
    rank, n = dist.get_rank(mesh.get_group()), mesh.size()
    if mask.shape[-1] != n * (video + text):
        return mask
    text_start = n * video + rank * text
    return torch.cat((mask[..., rank * video:(rank + 1) * video], mask[..., text_start:text_start + text]), dim=-1)


def _gather(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """``x`` of every rank of ``group``, concatenated along ``dim`` in rank order (inference: no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def ring_needs_gather(parallel_config: Any, backend: Any) -> bool:
    """True when a dense call under ring attention (ulysses degree 1) would reach a backend that cannot return the
    log-sum-exp diffusers' ring template merges with (``native``, the default on CPU): such calls gather the keys
    instead (:func:`joint_ring_dense`). Ulysses x ring stays on diffusers' path."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    cfg = _cp_config(parallel_config)
    if cfg is None or cfg.ring_degree == 1 or cfg.ulysses_degree != 1:
        return False
    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    return name == AttentionBackendName.NATIVE


def joint_ring_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     parallel_config: Any, backend: Any, scale: Optional[float] = None) -> torch.Tensor:
    """Dense attention of this rank's queries over the keys of every ring rank, with each rank's key mask gathered
    alongside (diffusers' ring template applies this rank's mask to every key shard, which is wrong for a key
    mask). Key order does not matter to dense attention, so the chunks stay in rank order."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    group = _cp_config(parallel_config)._ring_mesh.get_group()
    kv = _gather(torch.stack((k, v)), group, dim=2)
    if mask is not None:
        mask = _gather(mask, group, dim=-1)
    return dispatch_attention_fn(q, kv[0], kv[1], attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale,
                                 backend=backend)


def _ring_joint(processor: Any, cfg: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                joint: tuple[int, int]) -> torch.Tensor:
    """Ring with joint text (see the module docstring): this rank's video rows and every text row over the whole
    sequence (gathered, put in ``[video | text]`` order), keeping this rank's text chunk."""
    group = cfg._ring_mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    video, text = joint
    pattern = plan.parts[0].pattern
    _check_whole_blocks(pattern, video)  # before any collective, so every rank fails alike
    if q.requires_grad or k.requires_grad or v.requires_grad:
        raise NotImplementedError("vidattn ring attention is inference-only (no gradient through the K/V gather); "
                                  "train with ulysses context parallelism")
    kv = _gather(torch.stack((k, v)), group, dim=2).index_select(2, joint_order(world, video, text, q.device)[0])
    outs = []
    for rows, start in ((q[:, :video], rank * video), (_gather(q[:, video:], group, dim=1), world * video)):
        sub = row_pattern(pattern, start, rows.shape[1])
        outs.append(torch.zeros_like(rows) if sub is None else sparse_attention(
            rows, kv[0], kv[1], sub, scale=plan.scale, layout="bshd", backend=processor.backend))
    return torch.cat((outs[0], outs[1][:, rank * text:(rank + 1) * text]), dim=1)


# ------------------------------------------------------------------------------------------------ the processor's op
class _SparseOp:
    """``forward_op`` / ``backward_op`` for diffusers' templated context-parallel attention: ``fn(q, k, v)`` on the
    gathered sequence; the backward recomputes it under autograd (as diffusers' native op does)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def forward(self, ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None, enable_gqa: bool = False,
                return_lse: bool = False, _save_ctx: bool = True, _parallel_config: Any = None) -> torch.Tensor:
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
        return self.fn(query, key, value)

    def backward(self, ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = self.fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)


def _local_dense(backend: Any, layout: TokenLayout) -> Callable:
    """Dense attention on the gathered sequence (a method's dense plan inside the Ulysses op), no CP; padded text
    keys (``layout.key_lengths()``) masked."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    lengths = layout.key_lengths()

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        mask = None
        if lengths is not None:
            keep = torch.arange(k.shape[1], device=k.device) < torch.tensor(lengths, device=k.device)[:, None]
            mask = keep[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=mask, scale=scale, backend=backend)
    return dense


def _check(cfg: Any, processor: Any, heads: int) -> None:
    if cfg.ulysses_anything or cfg.ring_anything:
        raise ValueError("vidattn sparse attention needs equal shards: ulysses_anything / ring_anything are not "
                         "supported (use a token count and head count divisible by the degrees)")
    if heads % cfg.ulysses_degree:
        raise ValueError(f"ulysses degree {cfg.ulysses_degree} does not divide the {heads} attention heads")
    if cfg.ring_degree > 1 and not processor.static_pattern:
        raise ValueError(f"vidattn {processor.method}: ring attention needs a pattern known before the call; this "
                         "method selects blocks from the whole sequence's q and k per call. Use ulysses context "
                         "parallelism (ContextParallelConfig(ulysses_degree=N), --cp ulysses:N)")


@torch.compiler.disable
def context_parallel_attention(processor: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               layout: TokenLayout, dense_fn: Callable) -> tuple[torch.Tensor, AttentionPlan]:
    """A vidattn processor's sparse call on BSHD local shards under ``processor._parallel_config`` (Ulysses, Ring
    or both; see the module docstring). ``dense_fn`` is the stock, CP-aware dense path (dense plans). Returns the
    local output and the plan (for statistics)."""
    config = processor._parallel_config
    cfg = _cp_config(config)
    _check(cfg, processor, q.shape[2])
    if processor.static_pattern:  # cheap (cached); a dense plan goes through diffusers' own CP attention
        plan = processor.plan(dataclasses.replace(layout, order=processor.token_order), q, k, v)
        if plan.dense:
            return dense_fn(q, k, v, scale=plan.scale), plan
    if cfg.ring_degree == 1:
        return _ulysses(processor, config, q, k, v, layout)
    return _ring(processor, cfg, q, k, v, layout)


def _ulysses(processor: Any, config: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             layout: TokenLayout) -> tuple[torch.Tensor, AttentionPlan]:
    from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

    plans: list[AttentionPlan] = []
    dense = _local_dense(processor._attention_backend, layout)
    n = _cp_config(config).ulysses_degree
    joint = _joint(layout, n)

    def attend(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
        order = None if joint is None else joint_order(n, *joint, qf.device)
        if order is not None:  # the gathered [v0 t0 v1 t1 ...] in [video | text] order
            qf, kf, vf = (t.index_select(1, order[0]) for t in (qf, kf, vf))
        out, plan = processor._attend_local(qf, kf, vf, layout, dense)
        plans.append(plan)
        return out if order is None else out.index_select(1, order[1])
    op = _SparseOp(attend)
    out = TemplatedUlyssesAttention.apply(q, k, v, None, 0.0, False, None, False, False, op.forward, op.backward,
                                          config)
    return out, plans[-1]


def _ring(processor: Any, cfg: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          layout: TokenLayout) -> tuple[torch.Tensor, AttentionPlan]:
    if layout.order != processor.token_order:
        raise ValueError(f"vidattn {processor.method}: ring attention needs the tokens in {processor.token_order!r} "
                         f"order before the split, but this call's are in {layout.order!r} order (the model has no "
                         "split-point hooks); use ulysses context parallelism")
    plan = processor.plan(layout, q, k, v)
    part = plan.parts[0]
    if len(plan.parts) != 1 or plan.perm is not None or part.epilogue is not None:
        raise ValueError(f"vidattn {processor.method}: ring attention takes one head-shared pattern without an "
                         "epilogue or reordering; use ulysses context parallelism")
    joint = _joint(layout, cfg.ring_degree * cfg.ulysses_degree)
    if joint is not None:
        if cfg.ulysses_degree > 1:
            raise ValueError("vidattn: Ulysses x Ring with joint text is not supported; use ulysses:N or ring:N")
        return _ring_joint(processor, cfg, q, k, v, plan, joint), plan
    unified = cfg.ulysses_degree > 1
    if unified:  # diffusers' all-to-all in the Ulysses group: a ring shard of the sequence for H/U heads
        from diffusers.models.attention_dispatch import SeqAllToAllDim

        group = cfg._ulysses_mesh.get_group()
        q, k, v = (SeqAllToAllDim.apply(group, t, 2, 1) for t in (q, k, v))
    out = ring_attention(q, k, v, part.pattern, group=cfg._ring_mesh.get_group(), scale=plan.scale,
                         backend=processor.backend)
    if unified:
        out = SeqAllToAllDim.apply(group, out, 1, 2)
    return out, plan
