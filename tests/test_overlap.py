"""The pipeline keeps its scorer fed: reading, rendering and cache lookups of the next chunk overlap the scoring of
the current one, and commits reach the cache as batches finish."""

from __future__ import annotations

import time

import pytest
from tests.helpers import pool_rows, write_jsonl

from grape_plugin import GrapeConfig, Score, hookimpl, pipeline, read, run_groups
from grape_plugin.plugins import load_plugins


class Sleeper:
    """A stand-in scorer that takes a fixed time per token and releases the GIL meanwhile, as a GPU call does."""

    seconds_per_token = 0.0

    def __init__(self, cfg: GrapeConfig):
        from transformers import AutoTokenizer

        self.tokenizer, self.identity, self.slept = AutoTokenizer.from_pretrained(str(cfg.model)), "sleeper", 0.0

    def score(self, items, progress=None, done=None):
        pause = self.seconds_per_token * sum(len(i.input_ids) for i in items)
        time.sleep(pause)
        self.slept += pause
        return [Score(-float(i.n_tokens), i.n_tokens) for i in items]


class OlderSleeper(Sleeper):
    """The same, written against the protocol before ``done``."""

    def score(self, items, progress=None):
        return super().score(items, progress)


class Plugin:
    @hookimpl
    def grape_register_scorers(self, register):
        register("sleeper", Sleeper)
        register("older-sleeper", OlderSleeper)


@pytest.fixture
def sleeper():
    pm, plugin = load_plugins(), Plugin()
    pm.register(plugin, name="sleeper-scorer")
    yield
    pm.unregister(plugin)


def test_rendering_overlaps_scoring(tiny_model, tmp_path, monkeypatch, sleeper):
    """With the scorer busy four times as long as rendering takes, render + score stages stay within 10% of the
    scorer's own time, plus a fixed 0.15 s for what nothing can overlap (the first chunk, the worker's start): one
    after the other they would take 1.25 times as long, more than that bound once rendering takes over 0.25 s."""
    pool = write_jsonl(tmp_path / "pool.jsonl", pool_rows(100))
    cfg = GrapeConfig(model=str(tiny_model), scorer="sleeper", cache_dir=None)
    data = read(pool, cfg)
    monkeypatch.setattr(pipeline, "SHARE_CHUNK", 16)  # about 50 chunks
    instant = run_groups(data.grouped, cfg).stats
    tokens = instant.tokens_scored
    monkeypatch.setattr(Sleeper, "seconds_per_token", 4 * instant.stages["render"] / tokens)
    scorer = Sleeper(cfg)
    stages = run_groups(data.grouped, cfg, scorer=scorer).stats.stages
    assert instant.stages["render"] > 0.25, "too little to render for the bound to tell overlap from none"
    assert stages["render"] + stages["score"] <= 1.1 * scorer.slept + 0.15, (stages, scorer.slept)


def test_commits_reach_the_cache_batch_by_batch_from_one_score_call(pool_file, tiny_model, tmp_path, monkeypatch):
    from grape_plugin.cache import ScoreCache
    from grape_plugin.scoring import TransformersScorer

    calls, commits = [], []
    real_score, real_put = TransformersScorer.score, ScoreCache.put_many
    monkeypatch.setattr(TransformersScorer, "score",
                        lambda self, items, **kw: calls.append(len(items)) or real_score(self, items, **kw))
    monkeypatch.setattr(ScoreCache, "put_many",
                        lambda self, pairs: commits.append(list(pairs)) or real_put(self, commits[-1]))
    cfg = GrapeConfig(model=str(tiny_model), cache_dir=tmp_path / "cache", batch_tokens=512)
    first = run_groups(read(pool_file, cfg).grouped, cfg).stats
    scored = [c for c in commits if any(e.score is not None for _, e in c)]
    assert calls == [first.scored] and len(scored) > 3 and sum(map(len, scored)) == first.scored
    again = run_groups(read(pool_file, cfg).grouped, cfg).stats
    assert again.cached == first.scored and again.scored == 0 and not again.model_loaded
    assert "load" in first.stages and "load" not in again.stages  # weight loading is a stage of its own


def test_a_scorer_without_done_has_its_scores_committed_when_it_returns(pool_file, tiny_model, tmp_path, sleeper):
    cfg = GrapeConfig(model=str(tiny_model), scorer="older-sleeper", cache_dir=tmp_path / "cache",
                      keep_token_scores=False)  # its scores have no per-token arrays
    first = run_groups(read(pool_file, cfg).grouped, cfg).stats
    again = run_groups(read(pool_file, cfg).grouped, cfg).stats
    assert first.scored > 0 and again.cached == first.scored and again.scored == 0
