"""The reference backend: SDPA with the pattern's dense boolean mask (ground truth for tests; small sizes)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .pattern import BlockPattern

__all__ = ["reference_attention"]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *, scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Masked attention on ``(B, H, S, D)`` tensors. Rows with no attended key give 0 (and LSE ``-inf``)."""
    b = q.shape[0]
    mask = pattern.to(q.device).to_dense(batch=b)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale)
    out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    lse = None
    if return_lse:
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    return out, lse
