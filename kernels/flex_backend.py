"""FlexAttention backend: the pattern's block lists become a ``BlockMask`` via ``BlockMask.from_kv_blocks``.

Building from block lists costs milliseconds; ``create_block_mask`` would evaluate the mask on every token pair
(seconds at 16k tokens on a CPU). Full blocks go to the ``full_kv_*`` lists (no per-token check); partial blocks,
blocks cut by the ragged tail and blocks past a sample's key length go to the masked lists, whose ``mask_mod``
applies the predicate (on predicate blocks only), ``kv < kv_len`` and ``kv < kv_lens[b]``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .pattern import BlockPattern

__all__ = ["flex_sparse_attention", "pattern_to_block_mask"]

logger = logging.getLogger("vidattn.kernels")
_compiled = {}


def _split_lists(bitmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks (B,H,nq) int32, indices (B,H,nq,nk) int32) with listed blocks first, ascending."""
    order = torch.sort((~bitmap).to(torch.int8), dim=-1, stable=True).indices
    return bitmap.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()


def pattern_to_block_mask(pattern: BlockPattern, batch: Optional[int] = None, heads: Optional[int] = None):
    """The FlexAttention ``BlockMask`` equivalent to ``pattern`` (exactly: same token-level mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    listed = pattern.block_bitmap()
    pred_blocks = pattern.partial_bitmap()
    masked = pred_blocks.clone()
    nk = pattern.num_kv_blocks
    if pattern.kv_len % pattern.block_kv:
        masked[..., nk - 1] = True
    if pattern.q_len % pattern.block_q:
        masked[..., -1, :] = True
    kv_lens = pattern.kv_lens
    if kv_lens is not None:
        first_cut = int(kv_lens.min()) // pattern.block_kv
        masked[..., first_cut:] = True
    masked &= listed
    full = listed & ~masked
    num, idx = _split_lists(masked)
    fnum, fidx = _split_lists(full)
    predicate = pattern.predicate
    kv_len = pattern.kv_len
    bq, bk = pattern.block_q, pattern.block_kv
    bp, hp = pattern.groups

    def mask_mod(b, h, q_idx, kv_idx):
        # The mask_mod alone must define the mask (eager FlexAttention evaluates it on every pair); the block
        # lists only let the compiled kernel skip blocks.
        gb = b if bp > 1 else 0
        gh = h if hp > 1 else 0
        qb, kb = q_idx // bq, kv_idx // bk
        keep = (kv_idx < kv_len) & listed[gb, gh, qb, kb]
        if predicate is not None:
            keep = keep & (~pred_blocks[gb, gh, qb, kb] | predicate(q_idx, kv_idx))
        if kv_lens is not None:
            keep = keep & (kv_idx < kv_lens[b])
        return keep

    return BlockMask.from_kv_blocks(num, idx, fnum, fidx.clone(), BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(pattern.q_len, pattern.kv_len))


def _flex_fn(device: torch.device, compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if device.type not in _compiled:
        _compiled[device.type] = torch.compile(flex_attention, dynamic=False)
    return _compiled[device.type]


def flex_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *, scale: Optional[float] = None,
    return_lse: bool = False, compiled: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """FlexAttention over the pattern's ``BlockMask`` on ``(B, H, S, D)`` inputs.

    On CPU, compiled FlexAttention has no backward and no LSE output: those requests run eagerly (unfused,
    quadratic memory) and say so in the log.
    """
    block_mask = pattern.to_block_mask()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and (return_lse or needs_grad):
        if compiled:
            logger.info("flex backend on CPU: LSE/backward requested, running FlexAttention eagerly")
        compiled = False
    fn = _flex_fn(q.device, compiled)
    if return_lse:
        out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        return out, lse.float()
    return fn(q, k, v, block_mask=block_mask, scale=scale), None
