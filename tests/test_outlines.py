"""Outlines: groups hold no text, texts are read back a chunk at a time, and a rerun reads no rows to group."""

from __future__ import annotations

import os

import pytest

from grape_plugin import GrapeConfig, pipeline
from grape_plugin.formats import LongRows
from grape_plugin import read, run, run_groups
from grape_plugin.records import CandidateOutline, Grouped, GroupOutline
from tests.helpers import pool_rows, write_jsonl


def test_groups_are_outlines_whose_texts_load_back(pool_file):
    data = read(pool_file, GrapeConfig(cache_dir=None))
    assert all(isinstance(g, GroupOutline) and g.prompt_hash for g in data.groups)
    assert all(isinstance(c, CandidateOutline) and len(c.digest) == 16 and c.chars > 0
               for g in data.groups for c in g.candidates)  # fmt: skip
    rows = pool_rows(6)
    for g in data.texts():
        assert g.prompt == ({"role": "user", "content": rows[g.candidates[0].row]["instruction"]},)
        assert all(c.response == rows[c.row]["output"] for c in g.candidates)


def test_a_rerun_groups_from_the_saved_outlines(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pool.jsonl", pool_rows(4))
    cfg = GrapeConfig(cache_dir=tmp_path / "cache")
    first = read(path, cfg)
    with monkeypatch.context() as m:
        m.setattr(LongRows, "read_row", lambda *a: pytest.fail("a row was read to group again"))
        again = read(path, cfg)
    assert again.groups == first.groups and again.grouped.drops == first.grouped.drops
    assert again.texts() == first.texts()  # texts still come from the data
    by_prompt = read(path, cfg.model_copy(update={"group_by": "prompt"}))  # another option: grouped again
    assert [len(g.candidates) for g in by_prompt.groups] == [len(g.candidates) for g in first.groups]
    assert by_prompt.groups[0].key.startswith("p:") and first.groups[0].key == "ae-000"
    write_jsonl(path, pool_rows(3))  # changed data: grouped again
    os.utime(path, ns=(1, 1))
    assert len(read(path, cfg).groups) == 3


def test_a_run_in_small_chunks_loads_a_chunk_at_a_time_and_selects_the_same(pool_file, tiny_model, monkeypatch):
    cfg = GrapeConfig(model=str(tiny_model), cache_dir=None)
    whole = run(pool_file, cfg)[1]
    data = read(pool_file, cfg)
    loaded: list[int] = []

    def load(groups):
        loaded.append(sum(len(g.candidates) for g in groups))
        return data.grouped.load(groups)

    monkeypatch.setattr(pipeline, "SHARE_CHUNK", 8)  # one instruction of the pool at a time
    chunked = run_groups(Grouped(data.groups, data.grouped.drops, (), load), cfg)
    assert len(loaded) == len(data.groups) and max(loaded) <= 8
    assert chunked.kept == whole.kept and chunked.fits == pytest.approx(whole.fits, abs=1e-5)  # other batches
    assert all(s.token_logprobs is None for s in chunked.scores.values())  # arrays are not kept in memory
    (group, cand), *_ = chunked.picks_in_order(texts=True)
    assert cand.response and group.prompt
    in_order = list(chunked.picks_in_order(texts=True, chunk=2))  # written a couple of picks at a time
    assert in_order == list(chunked.picks_in_order(texts=True)) and len(in_order) == len(data.groups)
    assert [c.origin for _, c in in_order] == sorted(c.origin for _, c in chunked.picks())
