"""Test processors shared by the processor and adapter tests."""
import torch

from vidattn import BlockPattern, DenseProcessor, SparseAttentionProcessor


class RandomBlocks(SparseAttentionProcessor):
    """A static random block pattern (column 0 and the diagonal always kept) with a token band on half its blocks."""

    method = "random-test"

    def __init__(self, block_size=16, **kw):
        super().__init__(**kw)
        self.block_size = block_size

    def pattern(self, layout, q, k):
        g = torch.Generator().manual_seed(layout.seq_len)
        n = -(-layout.seq_len // self.block_size)
        mask = (torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
        mask[:, 0] = True
        return BlockPattern.from_block_mask(mask, q_len=layout.seq_len, kv_len=layout.seq_len,
                                            block_q=self.block_size, partial=torch.rand(n, n, generator=g) < 0.5,
                                            predicate=lambda qi, ki: (qi - ki).abs() <= 40)


class PerturbedDense(DenseProcessor):
    """Dense mode with q scaled by 1 + 1e-3: the exactness comparison must notice it."""

    def attend(self, q, k, v, layout, dense_fn):
        return super().attend(q * (1 + 1e-3), k, v, layout, dense_fn)
