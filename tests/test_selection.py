"""Selection logic with hand-made scores: strategies, ties, budgets, and a property test over random pools."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from grape_plugin import Candidate, GrapeConfig, Group, Score, select
from grape_plugin.selection import TIE, seeded_sample, top_k


def make(groups_scores: list[list[float]]) -> tuple[list[Group], dict]:
    groups, scores = [], {}
    for g, means in enumerate(groups_scores):
        cands = [Candidate(f"r{g}-{i}", f"s{i}", row=i, index=i) for i in range(len(means))]
        groups.append(Group(f"g{g}", ({"role": "user", "content": f"q{g}"},), tuple(cands)))
        scores.update({(f"g{g}", i): Score(m * 10, 10) for i, m in enumerate(means)})
    return groups, scores


def cfg(**kw) -> GrapeConfig:
    return GrapeConfig(cache_dir=None, **kw)


def test_best_worst_topk():
    groups, scores = make([[-2.0, -1.0, -3.0, -0.5]])
    assert select(groups, scores, cfg())[0] == {"g0": (3,)}
    assert select(groups, scores, cfg(top_k=2))[0] == {"g0": (3, 1)}
    assert select(groups, scores, cfg(strategy="worst"))[0] == {"g0": (2,)}


def test_ties_break_by_input_order():
    assert top_k([-1.0, -1.0 + TIE / 2, -2.0], 1, +1) == [0]
    assert top_k([-1.0, -1.0 + 2 * TIE, -2.0], 1, +1) == [1]
    assert top_k([-3.0, -1.0, -1.0], 2, +1) == [1, 2]


def test_random_is_seeded_per_group():
    assert seeded_sample([0.0] * 8, 2, "g1", 0) == seeded_sample([0.0] * 8, 2, "g1", 0)
    picks = {tuple(seeded_sample([0.0] * 8, 1, f"g{i}", 0)) for i in range(40)}
    assert len(picks) > 3


def test_budget_keeps_best_fitting_instructions_and_counts_the_rest():
    groups, scores = make([[-2.0, -1.5], [-0.2, -3.0], [-1.0, -4.0]])
    kept, drops = select(groups, scores, cfg(budget=2))
    assert kept == {"g1": (0,), "g2": (0,)}
    assert drops.as_dict() == {"candidates": {"not_selected": 3, "over_budget": 1}, "instructions": {"over_budget": 1}, "rows": {}}
    assert set(select(groups, scores, cfg(budget_fraction=1 / 3))[0]) == {"g1"}


def test_single_candidates_pass_untouched_without_scores():
    groups, scores = make([[-1.0], [-1.0, -2.0]])
    del scores[("g0", 0)]
    assert select(groups, scores, cfg())[0] == {"g0": (0,), "g1": (0,)}


pools = st.lists(st.lists(st.floats(-20, 0, allow_nan=False), min_size=1, max_size=8), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(pools, st.integers(1, 4), st.sampled_from(["best", "worst", "random"]), st.none() | st.integers(1, 12))
def test_selection_keeps_top_k_and_accounts_for_everything(pool, k, strategy, budget):
    groups, scores = make(pool)
    kept, drops = select(groups, scores, cfg(top_k=k, strategy=strategy, budget=budget))
    total = sum(len(p) for p in pool)
    assert sum(len(v) for v in kept.values()) + drops.n_candidates == total
    assert len(kept) == (len(pool) if budget is None else min(budget, len(pool)))
    for g, means in enumerate(pool):
        picked = kept.get(f"g{g}")
        if picked is None:
            continue
        assert len(picked) == min(k, len(means)) and len(set(picked)) == len(picked)
        if strategy != "random":
            sign = 1 if strategy == "best" else -1
            rest = [sign * m for i, m in enumerate(means) if i not in picked]
            assert all(sign * means[p] >= max(rest, default=-99) - TIE for p in picked)
