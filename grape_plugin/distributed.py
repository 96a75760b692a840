"""Data-parallel work over ``torch.distributed`` ranks: shard the instructions, gather every score.

The host frameworks (torchrun, accelerate, Axolotl, LLaMA-Factory) already start the process group;
when there is none, or one rank, everything here is a no-op.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from .records import Drops, GroupOutline, Results, Share

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], size: Callable[[T], int]) -> list[T]:
    """This rank's share of ``items``: a split that every rank computes alike (largest first, each to the least
    loaded rank; ties by position), balanced by ``size``; input order is kept within the share."""
    rank, world = rank_world()
    if world == 1:
        return list(items)
    sizes = [size(x) for x in items]
    loads, owner = [0] * world, [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world), key=lambda r: (loads[r], r))
        loads[owner[i]] += sizes[i]
    return [x for x, r in zip(items, owner) if r == rank]


def all_gather(local: list[T]) -> list[T]:
    """The concatenation of every rank's ``local`` list, on every rank (picklable plain data only)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def agreed(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; a ``GrapeError`` on any rank is raised on all of them, so that no rank waits forever
    at the next collective for one that stopped."""
    from .errors import GrapeError

    try:
        value, error = fn(), None
    except GrapeError as exc:
        value, error = None, str(exc)
    errors = [e for e in all_gather([error]) if e is not None]
    if errors:
        raise GrapeError(errors[0])
    return value  # type: ignore[return-value]


def on_all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
    return all(all_gather([flag]))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def gather(share: Share, groups: Sequence[GroupOutline]) -> Share:
    """Every rank's share, on every rank: outcomes and results (no texts, no token ids); ``groups`` are all the
    run's instructions, in input order."""
    if rank_world()[1] == 1:
        return share
    parts = all_gather([(share.drops, share.counts, {g.key: [c.index for c in g.candidates] for g in share.groups},
                         share.results)])  # fmt: skip
    survivors = {k: set(v) for _, _, alive, _ in parts for k, v in alive.items()}
    kept = [g.with_candidates(c for c in g.candidates if c.index in survivors[g.key]) for g in groups if g.key in survivors]
    return Share(kept, sum((p[3] for p in parts), Results()), sum((p[0] for p in parts), Drops()),
                 *map(sum, zip(*(p[1] for p in parts))))  # fmt: skip
