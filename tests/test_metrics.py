"""Per-token log-probabilities and ranks, the fit metrics built on them, their cache, and the metric comparison."""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3

import numpy as np
import pytest
import torch
from tests.helpers import pool_rows, render_pair

from grape_plugin import Components, GrapeConfig, GrapeError, Score, run, write
from grape_plugin.cache import SCHEMA, Entry, ScoreCache
from grape_plugin.cli import main
from grape_plugin.models import load_model
from grape_plugin.plugins import registry
from grape_plugin.render import paper_renderer
from grape_plugin.scoring import TransformersScorer


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def scored(loaded):
    """Pool candidates scored in padded batches with shared prompts, and the direct per-token values of each."""
    render = paper_renderer(loaded.tokenizer)
    rows = pool_rows(2)
    items = [render_pair(render, [{"role": "user", "content": r["instruction"]}], r["output"][:500]) for r in rows]
    scores = TransformersScorer(loaded.as_spec(), batch_tokens=2000, max_padding=1.0).score(items)
    return [(s, *direct_tokens(loaded.model, list(i.input_ids), i.start, i.end)) for i, s in zip(items, scores)]


def direct_tokens(model, ids: list[int], start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch-1 fp32 reference from full logits: each response token's log-probability and its rank (how many
    vocabulary entries have a strictly higher logit)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    pos, targets = torch.arange(start - 1, end - 1), torch.tensor(ids[start:end])
    lp = logits.log_softmax(-1)[pos, targets].double().numpy()
    ranks = (logits[pos] > logits[pos, targets][:, None]).sum(-1).numpy()
    return lp, ranks


def test_token_logprobs_and_ranks_equal_full_logits(scored):
    for score, lp, ranks in scored:
        assert score.n_tokens == len(lp) == len(score.logprobs) == len(score.ranks)
        assert np.abs(score.logprobs - lp).max() < 1e-5
        assert (score.ranks == ranks).mean() > 0.99 and np.abs(score.ranks - ranks).max() <= 1  # fp ties at most
        assert abs(score.logprob_sum - lp.sum()) < 1e-4 and score.logprobs.dtype == np.float32
    assert any(s.ranks.max() > 0 for s, _, _ in scored) and any((s.ranks == 0).any() for s, _, _ in scored)


def reference(name: str, lp: np.ndarray, ranks: np.ndarray, cfg: GrapeConfig) -> float:
    """Each metric's definition, written out on the direct values."""
    return {
        "mean": lambda: lp.mean(),
        "sum": lambda: lp.sum(),
        "min_k": lambda: np.sort(lp)[: max(1, int(cfg.min_k_fraction * len(lp)))].mean(),
        "drop_first": lambda: lp[1:].mean(),
        "rsr": lambda: -np.minimum(ranks + 1, cfg.rsr_rank_clip).sum() / -lp.sum(),
    }[name]()


@pytest.mark.parametrize("name", ["mean", "sum", "min_k", "drop_first", "rsr"])
@pytest.mark.parametrize("params", [{}, {"min_k_fraction": 0.05, "rsr_rank_clip": 5}])
def test_metrics_equal_direct_computation(scored, name, params):
    cfg = GrapeConfig(metric=name, **params)
    fit = Components.of(cfg).fit
    for score, lp, ranks in scored:
        expected = reference(name, lp, ranks, cfg)
        assert abs(fit(score) - expected) < 1e-4 * max(1.0, abs(expected)), (name, fit(score), expected)


def test_every_metric_is_documented_with_its_paper():
    metrics = registry("metrics")
    assert {"mean", "sum", "min_k", "drop_first", "rsr"} <= set(metrics)
    for name in ("mean", "min_k", "drop_first", "rsr"):
        assert "arXiv" in metrics[name].doc


def test_scores_pickle_and_round_trip_the_cache(scored, tmp_path):
    score = scored[0][0]
    assert pickle.loads(pickle.dumps(score)) == score
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    cache = ScoreCache(tmp_path, "model-x")
    cache.put_many([(a, Entry(score, 40)), (b, Entry(score.without_tokens(), 30, True)), (d, Entry(None))])
    cache.put_many([(b, Entry(Score.of(-1.0, 1), 9))])  # a later entry that knows as much wins
    cache.close()
    got = ScoreCache(tmp_path, "model-x").get_many([a, b, c, d])
    assert got[a].score == score and np.array_equal(got[a].score.ranks, score.ranks) and got[a].n_ids == 40
    assert got[b] == Entry(Score(-1.0, 1), 9) and got[d] == Entry(None, 0) and set(got) == {a, b, d}
    light = ScoreCache(tmp_path, "model-x").get_many([a, b], arrays=False)  # what a metric without arrays reads
    assert light == {a: Entry(score.without_tokens(), 40, arrays=True), b: got[b]}


def test_an_old_cache_is_ignored(tmp_path):
    old = sqlite3.connect(tmp_path / (hashlib.sha256(b"model-x").hexdigest()[:24] + ".sqlite"))
    old.execute("CREATE TABLE scores (key TEXT PRIMARY KEY, logprob_sum REAL, n_tokens INTEGER)")
    old.commit()
    old.close()
    other = ScoreCache(tmp_path, "model-x").folder / "old.grs"
    other.write_bytes(b"GRAPE-SC" + (SCHEMA - 1).to_bytes(4, "little") + bytes(80))  # another schema
    key = bytes(32)
    assert ScoreCache(tmp_path, "model-x").get_many([key]) == {}
    cache = ScoreCache(tmp_path, "model-x")
    cache.put_many([(key, Entry(Score.of(-3.0, 2, [-1, -2], [0, 3]), 5))])
    cache.close()
    assert ScoreCache(tmp_path, "model-x").get_many([key])[key].score.ranks.tolist() == [0, 3]


def test_a_torn_or_damaged_cache_file_keeps_its_complete_records(tmp_path):
    cache = ScoreCache(tmp_path, "model-x")
    keys = [bytes([i]) * 32 for i in range(3)]
    cache.put_many((k, Entry(Score.of(-i, i + 1, [-1.0] * (i + 1)), 9)) for i, k in enumerate(keys))
    cache.close()
    (path,) = cache.files()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # killed mid-write: the last record is cut short
    assert set(ScoreCache(tmp_path, "model-x").get_many(keys)) == set(keys[:2])
    damaged = bytearray(whole)
    damaged[-20] ^= 0xFF  # a flipped bit in the last record's arrays
    path.write_bytes(bytes(damaged))
    assert set(ScoreCache(tmp_path, "model-x").get_many(keys)) == set(keys[:2])


def test_changing_the_metric_runs_no_model(tiny_model, pool_file, tmp_path):
    base = {"model": str(tiny_model), "cache_dir": tmp_path / "cache"}
    _, first = run(pool_file, GrapeConfig(**base), token_scores=True)
    assert first.stats.scored > 0 and first.stats.model_loaded
    kept = {}
    for name in ("sum", "min_k", "drop_first", "rsr"):
        data, again = run(pool_file, GrapeConfig(metric=name, **base), token_scores=True)
        assert again.stats.scored == 0 and not again.stats.model_loaded and again.stats.cached == first.stats.scored
        kept[name] = again.kept
        if name == "rsr":
            rsr_data, rsr_selection = data, again
    fit = Components.of(GrapeConfig(metric="rsr")).fit
    out = write(rsr_data, rsr_selection, tmp_path / "out")  # the scores table and the report say which metric chose
    rows = [json.loads(line) for line in out["scores"].read_text().splitlines()]
    assert json.loads(out["report"].read_text())["metric"] == "rsr"
    assert all(r["fit"] == pytest.approx(fit(rsr_selection.scores[(r["group"], r["index"])])) for r in rows
               if r["score"] is not None)  # fmt: skip
    for g in first.groups:  # rsr keeps each instruction's candidate with the lowest rank-surprisal ratio
        best = max(g.candidates, key=lambda c: fit(first.scores[(g.key, c.index)]))
        assert kept["rsr"][g.key] == (best.index,)
    assert kept["sum"] != first.kept  # the sum prefers short responses


def test_metrics_refuse_scores_without_what_they_need(tiny_model, pool_file, tmp_path):
    with pytest.raises(GrapeError, match="set keep_token_scores"):
        run(pool_file, GrapeConfig(model=str(tiny_model), metric="rsr", keep_token_scores=False, cache_dir=None))
    vllm_like = Score.of(-3.0, 2, [-1.0, -2.0])  # log-probabilities but no ranks
    assert Components.of(GrapeConfig(metric="min_k")).fit(vllm_like) == -2.0
    with pytest.raises(GrapeError, match="metric 'rsr' needs per-token ranks"):
        Components.of(GrapeConfig(metric="rsr")).fit(vllm_like)
    with pytest.raises(GrapeError, match="no metric named 'nope'; registered: mean, sum"):
        Components.of(GrapeConfig(metric="nope"))


def test_cache_without_token_scores_is_smaller_and_rescored_when_they_are_wanted(tiny_model, pool_file, tmp_path):
    base = {"model": str(tiny_model), "cache_dir": tmp_path / "cache"}
    _, lean = run(pool_file, GrapeConfig(keep_token_scores=False, **base))
    assert all(s.token_logprobs is None for s in lean.scores.values())
    _, full = run(pool_file, GrapeConfig(metric="rsr", **base))
    assert full.stats.cached == 0 and full.stats.scored == lean.stats.scored
    _, again = run(pool_file, GrapeConfig(keep_token_scores=False, **base))
    assert again.stats.scored == 0 and all(s.token_logprobs is None for s in again.scores.values())


def test_compare_command(tiny_model, pool_file, tmp_path, capsys):
    out = tmp_path / "compare.json"
    args = ["compare", str(pool_file), "--model", str(tiny_model), "--cache-dir", str(tmp_path / "c"), "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    info = json.loads(out.read_text())
    names = ["mean", "sum", "min_k", "drop_first", "rsr"]
    assert list(info["agreement"]) == names and info["instructions"] == 6 and not info["skipped"]
    for a in names:
        assert info["agreement"][a][a] == 1.0 and sum(info["wins_per_source"][a].values()) == 6
        assert all(info["agreement"][a][b] == info["agreement"][b][a] for b in names)
    assert info["mean_tokens"]["sum"] < info["mean_tokens"]["mean"]
    assert "share of them where two metrics keep the same candidates" in text and "wins per source:" in text
    assert main(args) == 0  # again, every score from the cache: with its per-token arrays, so nothing is skipped
    assert json.loads(out.read_text()) == info
    assert main(["compare", str(pool_file), "--model", str(tiny_model), "--cache-dir", str(tmp_path / "c"),
                 "--metrics", "mean,rsr", "--no-keep-token-scores"]) == 0  # fmt: skip
    assert "skipped rsr: metric 'rsr' needs per-token ranks" in capsys.readouterr().out
