"""The data order: a seeded permutation per epoch, cut into global batches, each split across the processes.

A position is one integer, the number of micro-batches consumed so far, so a checkpoint stores it as is and a
resumed run continues with the very next batch. A global batch is the same for any number of processes: with
``P`` processes of ``b`` clips, process ``r`` takes positions ``[r*b, (r+1)*b)`` of the global batch of ``P*b``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchPlan"]


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per process
    world_size: int = 1
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch (at least one; a dataset smaller than a batch repeats clips)."""
        return max(1, self.num_samples // self.global_batch)

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def global_indices(self, position: int) -> list[int]:
        """Dataset indices of the global batch at micro-batch ``position``."""
        epoch, k = divmod(position, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        start = k * self.global_batch
        return [order[(start + i) % self.num_samples] for i in range(self.global_batch)]

    def local(self, position: int, rank: int) -> tuple[list[int], list[int]]:
        """``(dataset indices, positions within the global batch)`` of process ``rank``'s share."""
        slots = list(range(rank * self.batch_size, (rank + 1) * self.batch_size))
        indices = self.global_indices(position)
        return [indices[s] for s in slots], slots

    def epoch(self, position: int) -> int:
        return position // self.batches_per_epoch
