"""Rendering spans and scores, checked against a direct full-logit computation on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import build_tiny_model, pool_rows, render_pair

from grape_plugin import GrapeError
from grape_plugin.models import load_model
from grape_plugin.render import Rendered, chat_renderer, fit_length, paper_renderer
from grape_plugin.scoring import TransformersScorer, prefix_rows, row_width, shared_prefixes, token_batches

PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def spec(loaded):
    return loaded.as_spec()


def direct_mean(model, ids: list[int], start: int, end: int) -> float:
    """Batch-1 fp32 reference: full logits, log-softmax over the vocabulary, mean over the span."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)
    return float(sum(lp[p - 1, ids[p]] for p in range(start, end)) / (end - start))


def test_paper_span_is_exactly_the_response(loaded):
    render = paper_renderer(loaded.tokenizer)
    item = render_pair(render, PROMPT, "Deep blue, like the sea.")
    decoded = loaded.tokenizer.decode(item.input_ids[item.start : item.end])
    assert decoded.strip() == "Deep blue, like the sea."
    head = loaded.tokenizer.decode(item.input_ids[: item.start], skip_special_tokens=True)
    assert head.rstrip() == "Question: Name a colour.\nAnswer:"
    assert item.end == len(item.input_ids)  # nothing after the response is scored


def test_chat_span_excludes_end_of_turn(loaded):
    item = render_pair(chat_renderer(loaded.tokenizer), PROMPT, "Red.")
    tok = loaded.tokenizer
    assert tok.decode(item.input_ids[item.start : item.end]) == "Red."
    assert tok.decode(item.input_ids[item.end :]).startswith("</s>")


def test_chat_needs_a_chat_template(tmp_path):
    tok = load_model(str(build_tiny_model(tmp_path, with_chat_template=False)), device="cpu").tokenizer
    with pytest.raises(GrapeError, match="no chat template"):
        chat_renderer(tok)


def test_scores_equal_direct_computation_batched_or_not(loaded, spec):
    render = paper_renderer(loaded.tokenizer)
    rows = pool_rows(2)
    items = [render_pair(render, [{"role": "user", "content": r["instruction"]}], r["output"][:600]) for r in rows]
    one_at_a_time = TransformersScorer(spec, batch_tokens=1).score(items)
    batched = TransformersScorer(spec, batch_tokens=100_000, max_padding=1.0).score(items)
    assert len({len(i.input_ids) for i in items}) > 5  # real padding happens in the batched run
    for item, a, b in zip(items, one_at_a_time, batched):
        assert a.n_tokens == b.n_tokens == item.n_tokens
        assert abs(a.mean - b.mean) < 1e-5
        assert abs(a.mean - direct_mean(loaded.model, list(item.input_ids), item.start, item.end)) < 1e-5


def long_prompt_items(loaded, n: int = 5, turn: int = 0) -> list[Rendered]:
    """Candidates behind a long shared prompt (earlier turns of a chat), as in multi-turn data."""
    rows = pool_rows(3)
    earlier = rows[8 * turn]
    history = [{"role": "user", "content": earlier["instruction"]}, {"role": "assistant", "content": earlier["output"][:700]}]
    prompt = history + [{"role": "user", "content": rows[8 + 8 * turn]["instruction"]}]
    render = paper_renderer(loaded.tokenizer)
    return [render_pair(render, prompt, r["output"][: 80 + 40 * i]) for i, r in enumerate(rows[8 + 8 * turn :][:n])]


def test_shared_prefix_scores_are_exact_and_cheaper(loaded, spec):
    items = long_prompt_items(loaded)
    assert shared_prefixes(items)[0][0] > 100  # one job sharing the long prompt
    plain = TransformersScorer(spec, share_prefixes=False)
    shared = TransformersScorer(spec, batch_tokens=2000)  # one row: the prompt once, then every candidate's rest
    a, b = plain.score(items), shared.score(items)
    assert shared.share and shared.positions_run < 0.6 * plain.positions_run
    assert loaded.model.config._attn_implementation == "sdpa"  # the two-pass attention was on for its batches only
    for item, x, y in zip(items, a, b):
        assert x.n_tokens == y.n_tokens and abs(x.mean - y.mean) < 1e-5
        assert abs(y.mean - direct_mean(loaded.model, list(item.input_ids), item.start, item.end)) < 1e-5


def test_shared_rows_are_exact_however_the_rows_fall(loaded, spec):
    """Several rows per prompt, several prompts per batch, padding between, and an item alone beside them."""
    alone = [render_pair(paper_renderer(loaded.tokenizer), PROMPT, "Green.")]
    items = long_prompt_items(loaded) + alone + long_prompt_items(loaded, n=4, turn=1)
    assert len(shared_prefixes(items)) == 3  # two shared prompts and the item alone
    direct = [direct_mean(loaded.model, list(r.input_ids), r.start, r.end) for r in items]
    for budget in (400, 1000, 100_000):
        scorer = TransformersScorer(spec, batch_tokens=budget, max_padding=1.0)
        assert all(abs(s.mean - d) < 1e-5 and s.n_tokens == r.n_tokens for s, d, r in zip(scorer.score(items), direct, items))


def test_prompts_are_shared_only_where_the_model_hands_attention_its_arguments(loaded, spec, monkeypatch):
    """Shared rows need transformers' attention backend (the call's arguments reach the attention function)."""
    monkeypatch.setattr(type(loaded.model), "_supports_attention_backend", False)
    scorer = TransformersScorer(spec, share_prefixes=True)
    scorer.load()
    assert not scorer.share


def test_packed_rows_score_like_padded_batches(loaded, spec):
    items = long_prompt_items(loaded) + [render_pair(paper_renderer(loaded.tokenizer), PROMPT, "Green.")]
    packed = TransformersScorer(spec, batch_tokens=100_000, pack=True, share_prefixes=False)
    padded = TransformersScorer(spec, batch_tokens=100_000, pack=False, share_prefixes=False, max_padding=1.0)
    for x, y in zip(packed.score(items), padded.score(items)):
        assert abs(x.mean - y.mean) < 1e-5
    assert packed.positions_run == sum(len(i.input_ids) for i in items) < padded.positions_run


def test_token_batches_respect_the_budget():
    sizes = [5, 9, 3, 9, 2]
    batches = list(token_batches(sizes, 18))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(len(b) * max(sizes[i] for i in b) <= 18 or len(b) == 1 for b in batches)
    assert batches[0] == [1, 3]  # longest first
    for batch in token_batches(sizes, 1000, max_padding=0.25):
        lengths = [sizes[i] for i in batch]
        assert 1 - sum(lengths) / (max(lengths) * len(lengths)) <= 0.25


def test_a_gpu_batch_is_cut_for_padding_only_once_it_is_half_full():
    sizes = [100, 60, 59, 58, 57, 20]
    assert list(token_batches(sizes, 1000, max_padding=0.04)) == [[0], [1, 2, 3, 4], [5]]
    assert list(token_batches(sizes, 1000, max_padding=0.04, min_fill=0.5)) == [[0, 1, 2, 3, 4], [5]]


def test_prefix_rows_hold_the_prefix_once_and_fit_the_budget():
    sizes = [100, 40, 70, 60, 200]  # item 4 alone is longer than the budget
    rows = prefix_rows(sizes, 30, [0, 1, 2, 3, 4], budget=150)
    assert sorted(i for _, row in rows for i in row) == [0, 1, 2, 3, 4] and all(s == 30 for s, _ in rows)
    assert rows[0] == (30, [4]) and all(row_width(r, sizes.__getitem__) <= 150 for r in rows[1:])
    assert len(rows) == 3  # 30 + 70 + 40, then 30 + 30 + 10: the rests of items 0 and 2, then of 3 and 1


def test_one_pass_hands_each_batch_over_once_and_keeps_arrays_only_when_asked(loaded, spec):
    render = paper_renderer(loaded.tokenizer)
    rows = pool_rows(2)
    items = [render_pair(render, [{"role": "user", "content": r["instruction"]}], r["output"][:300]) for r in rows]
    handed, tokens = [], []
    full = TransformersScorer(spec, batch_tokens=600).score(items, progress=tokens.append,
                                                             done=lambda i, s: handed.append((list(i), list(s))))
    assert len(handed) > 2 and sorted(i for batch, _ in handed for i in batch) == list(range(len(items)))
    assert all(full[i] == s for batch, scores in handed for i, s in zip(batch, scores))
    assert sum(tokens) == sum(len(i.input_ids) for i in items)
    lean = TransformersScorer(spec, batch_tokens=600, token_scores=False).score(items)
    assert all(s.token_logprobs is None and s.token_ranks is None for s in lean)
    assert all(a.n_tokens == b.n_tokens and abs(a.mean - b.mean) < 1e-6 for a, b in zip(full, lean))


def test_out_of_memory_halves_the_batch(loaded, spec, monkeypatch):
    scorer = TransformersScorer(spec, batch_tokens=100_000, max_padding=1.0)
    render = paper_renderer(loaded.tokenizer)
    items = [render_pair(render, PROMPT, f"Colour number {i} is nice.") for i in range(4)]
    expected = TransformersScorer(spec, batch_tokens=1).score(items)
    real, sizes = scorer._score_batch, []

    def flaky(rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(rows)

    monkeypatch.setattr(scorer, "_score_batch", flaky)
    got = scorer.score(items)
    assert sizes[:3] == [4, 2, 1] and [round(s.mean, 6) for s in got] == [round(s.mean, 6) for s in expected]


def test_fit_length_policies():
    item = Rendered(tuple(range(10)), 4, 10)
    assert fit_length(item, None, "drop") is item and fit_length(item, 10, "drop") is item
    assert fit_length(item, 8, "drop") is None
    assert fit_length(item, 8, "truncate") == Rendered(tuple(range(8)), 4, 8)
    assert fit_length(item, 4, "truncate") is None  # no response token would be left
    host_cut = Rendered((0, 1, 9, 2, 3, 4), 3, 6)  # a host truncates in its own way: its cut is used as it is
    assert fit_length(item, 8, "truncate", lambda: host_cut) is host_cut
    assert fit_length(item, 5, "truncate", lambda: host_cut) is None  # longer than max_length still
    assert fit_length(item, 8, "truncate", lambda: None) is None  # the host's cut lost the response
    assert fit_length(item, 8, "drop", lambda: host_cut) is None


def test_missing_model_and_gguf(tmp_path):
    with pytest.raises(GrapeError, match="no such file or folder"):
        load_model(str(tmp_path / "missing-model"), device="cpu")
    with pytest.raises(GrapeError, match="GGUF file not found"):
        load_model(str(tmp_path / "m.gguf"), device="cpu")


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    import importlib.util

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(GrapeError, match="needs the gguf package: pip install gguf"):
        load_model(str(gguf), device="cpu")


def test_labelled_span_is_the_last_labelled_run():
    from grape_plugin.render import labelled_span

    ids = [5, 6, 7, 8, 9, 10, 11]
    assert labelled_span(ids, [-100, 6, -100, -100, 9, 10, -100]) == Rendered(tuple(ids), 4, 6)
    with pytest.raises(GrapeError, match="labels no token"):
        labelled_span(ids, [-100] * 7)
    with pytest.raises(GrapeError, match="labels the whole row"):
        labelled_span(ids, ids)
