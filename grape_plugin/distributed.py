"""Data-parallel scoring over ``torch.distributed`` ranks: shard by instruction, gather every score.

The host frameworks (torchrun, accelerate, Axolotl, LLaMA-Factory) already start the process group;
when there is none, or one rank, everything here is a no-op.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list[T], key: Callable[[T], Any]) -> list[T]:
    """This rank's share: the items whose ``key`` is every ``world``-th distinct key (so a group stays on one rank)."""
    rank, world = rank_world()
    if world == 1:
        return items
    order = {k: n for n, k in enumerate(dict.fromkeys(key(i) for i in items))}
    return [i for i in items if order[key(i)] % world == rank]


def all_gather(local: list[T]) -> list[T]:
    """The concatenation of every rank's ``local`` list, on every rank (picklable plain data only)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def on_all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
    return all(all_gather([flag]))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()
