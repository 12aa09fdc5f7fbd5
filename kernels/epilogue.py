"""The fused output epilogue of Rectified SpaAttn: ``out = out * scale[q_block] + bias[q_block]``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Epilogue"]


@dataclass(frozen=True, eq=False)
class Epilogue:
    """Per (batch, head, query block) rectification applied to the normalised attention output.

    ``scale`` has shape ``(B, H, nq)`` and ``bias`` ``(B, H, nq, D)``; query token ``i`` uses entry
    ``i // block_q``. Kernels apply it to ``acc / l`` before the store; other backends after attention.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    def apply(self, out_bhsd: torch.Tensor, block_q: int) -> torch.Tensor:
        """Apply to a ``(B, H, S, D)`` output in fp32 and return it in the output's dtype."""
        b, h, s, d = out_bhsd.shape
        nq = -(-s // block_q)
        if self.scale.shape != (b, h, nq) or self.bias.shape != (b, h, nq, d):
            raise ValueError(f"epilogue scale must be {(b, h, nq)} and bias {(b, h, nq, d)}, "
                             f"got {tuple(self.scale.shape)} and {tuple(self.bias.shape)}")
        rows = torch.arange(s, device=out_bhsd.device) // block_q
        r = self.scale.float()[:, :, rows, None]
        o = self.bias.float()[:, :, rows, :]
        return (out_bhsd.float() * r + o).to(out_bhsd.dtype)
