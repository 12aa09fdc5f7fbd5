"""Processes of a batch run started by ``torchrun`` or ``accelerate launch``: rank and world size from the
launcher's environment, the share of items of each process, one device per process, and a barrier.

Sharding is a pure function of ``(items, rank, world)``, so any grouping of processes can reuse it: with context
parallelism (:func:`item_share`), consecutive ranks form groups of the CP degree and the items are sharded across
the groups; every rank of a group renders the group's items, its first rank writes them.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, TypeVar

__all__ = ["ItemShare", "ProcessInfo", "item_share", "process_group", "process_info", "rank_device",
           "shard_items"]

T = TypeVar("T")
# how long rank 0 waits for the others at the end of the run (they may render for hours)
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's ``rank`` among ``world`` processes, and its ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def process_info(environ: Optional[Mapping[str, str]] = None) -> ProcessInfo:
    """Rank, world size and local rank from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun and
    accelerate launch); a single process when they are absent."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"bad launcher environment (RANK, WORLD_SIZE, LOCAL_RANK): {err}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"bad launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return ProcessInfo(rank=rank, world=world, local_rank=local)


def shard_items(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items process ``rank`` of ``world`` renders: every ``world``-th item from position ``rank`` (round robin,
    so the shares differ by at most one item and long prompt lists stay balanced)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    return list(items[rank::world])


@dataclass(frozen=True)
class ItemShare:
    """This process's part in a batch: it renders the items of group ``group`` of ``groups`` (``shard_items(items,
    group, groups)``) and, when ``writer``, writes them."""

    group: int = 0
    groups: int = 1
    writer: bool = True


def item_share(info: ProcessInfo, degree: int = 1) -> ItemShare:
    """Groups of ``degree`` consecutive ranks (the context-parallel degree; 1: every process on its own), as
    ``vidattn.parallel.enable_context_parallel`` builds its meshes: group ``rank // degree``, written by its first
    rank. ValueError when the world size is not a multiple of ``degree``."""
    if degree < 1 or info.world % degree:
        raise ValueError(f"{info.world} processes do not split into groups of {degree}")
    return ItemShare(group=info.rank // degree, groups=info.world // degree, writer=info.rank % degree == 0)


def rank_device(device: str, info: ProcessInfo) -> str:
    """The device of this process: ``cuda`` without an index becomes ``cuda:<local rank>`` when several processes
    run; any other device is taken as given."""
    if info.distributed and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


@contextlib.contextmanager
def process_group(info: ProcessInfo) -> Iterator[Optional[object]]:
    """A gloo process group for the barrier at the end of a multi-process run (reuses one already set up, e.g. by
    context parallelism); yields None for a single process."""
    if not info.distributed:
        yield None
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world, timeout=BARRIER_TIMEOUT)
    try:
        yield dist
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
