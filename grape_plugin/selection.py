"""Choose responses: top-k per instruction (best = GRAPE, worst = reverse GRAPE, random), then a budget.

Ties: scores within ``TIE`` of the best remaining one count as equal, and the earliest candidate in input
order wins. Selections are therefore identical across batch sizes, dtypes' last bits and ranks wherever
the scores differ by more than ``TIE``.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

from .config import GrapeConfig
from .hookspecs import hookimpl
from .records import Drops, Group, GroupOutline, Reason

TIE = 1e-4


@dataclass(frozen=True)
class Selector:
    """``pick(scores, k, key)`` returns the indices of the kept candidates, best first.

    ``scores`` are the candidates' fits under the configured metric (higher = fits better; the mean log-probability
    by default) in input order; ``key`` is the group key (for seeded choices).
    ``budget_sign`` orders instructions under a budget: +1 keeps the highest-scoring, -1 the lowest.
    """

    pick: Callable[[Sequence[float], int, str, int], list[int]]
    budget_sign: int = 1


def top_k(scores: Sequence[float], k: int, sign: int) -> list[int]:
    """Repeatedly take the first candidate (input order) within ``TIE`` of the best remaining score."""
    left = list(range(len(scores)))
    chosen = []
    while left and len(chosen) < k:
        best = max(sign * scores[i] for i in left)
        winner = next(i for i in left if sign * scores[i] >= best - TIE)
        chosen.append(winner)
        left.remove(winner)
    return chosen


def seeded_sample(scores: Sequence[float], k: int, key: str, seed: int) -> list[int]:
    """A random ``k``: seeded by the group key, so shards and reruns agree."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(digest).sample(range(len(scores)), min(k, len(scores)))


@hookimpl
def grape_register_selectors(register: Callable[[str, Selector], None]) -> None:
    register("best", Selector(lambda s, k, key, seed: top_k(s, k, +1)))
    register("worst", Selector(lambda s, k, key, seed: top_k(s, k, -1), budget_sign=-1))
    register("random", Selector(seeded_sample))


def apply_budget(
    fits: list[tuple[str, float]], budget: Optional[int], fraction: Optional[float], sign: int
) -> Optional[set[str]]:
    """The group keys kept under a budget (None when there is none).

    ``fits`` is (group key, mean fit of its kept responses) in input order; ties keep input order.
    """
    if budget is None and fraction is None:
        return None
    n = budget if budget is not None else round(fraction * len(fits))
    ranked = sorted(range(len(fits)), key=lambda i: (-sign * fits[i][1], i))
    return {fits[i][0] for i in ranked[:n]}


def needs_scores(group: Group | GroupOutline, cfg: GrapeConfig) -> bool:
    """A group whose candidates all survive (and no budget ranks it) needs no forward pass."""
    return len(group.candidates) > cfg.top_k or cfg.budget is not None or cfg.budget_fraction is not None


def choose(
    groups: Iterable[Group | GroupOutline], fits: Mapping[tuple[str, int], float], selector: Selector, cfg: GrapeConfig
) -> tuple[dict[str, tuple[int, ...]], Drops]:
    """Kept candidate indices per group key (after ``selector`` and the budget), and what was not kept. ``fits``
    are each scored candidate's value of the run's metric (``metrics.py``)."""
    kept: dict[str, tuple[int, ...]] = {}
    group_fits: list[tuple[str, float]] = []
    candidates, instructions = Counter(), Counter()
    for g in groups:
        if not needs_scores(g, cfg):
            kept[g.key] = tuple(c.index for c in g.candidates)
            continue
        values = [fits[(g.key, c.index)] for c in g.candidates]
        picked = selector.pick(values, cfg.top_k, g.key, cfg.seed)
        kept[g.key] = tuple(g.candidates[p].index for p in picked)
        group_fits.append((g.key, sum(values[p] for p in picked) / len(picked)))
        candidates[Reason.NOT_SELECTED] += len(g.candidates) - len(picked)
    in_budget = apply_budget(group_fits, cfg.budget, cfg.budget_fraction, selector.budget_sign)
    if in_budget is not None:
        for key in [k for k, _ in group_fits if k not in in_budget]:
            instructions[Reason.OVER_BUDGET] += 1
            candidates[Reason.OVER_BUDGET] += len(kept.pop(key))
    return kept, Drops.of(candidates, instructions)
