"""End to end with the real embedded SmolLM2-135M-Instruct on the real AlpacaEval pool slice."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers import POOL, pool_rows, render_pair

from grape_plugin.cli import main
from grape_plugin.models import SMOLLM2_FILE, embedded_smollm2

pytestmark = pytest.mark.smollm2
MAX_LENGTH = 384  # keeps the CPU run short; truncation is part of what is checked


@pytest.fixture(scope="module")
def reference():
    """SmolLM2 loaded straight through transformers, without grape_plugin's loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(embedded_smollm2())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    return tok, model


def direct(tok, model, instruction: str, response: str) -> tuple[float, int]:
    """Batch-1 fp32: the paper's text, full logits, mean log-prob of the tokens that carry the response."""
    head = f"Question: {instruction}\nAnswer: "
    enc = tok(head + response, return_offsets_mapping=True)
    ids = enc["input_ids"][:MAX_LENGTH]
    span = [t for t, (a, b) in enumerate(enc["offset_mapping"][:MAX_LENGTH]) if b > len(head)]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return float(sum(lp[t - 1, ids[t]] for t in span) / len(span)), len(span)


def test_select_on_the_pool_slice_matches_direct_scores(tmp_path, reference, capsys):
    out = tmp_path / "out"
    argv = ["select", str(POOL), "--limit", "2", "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--max-length", str(MAX_LENGTH), "--over-length", "truncate"]
    assert main(argv) == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    rows = pool_rows(2)
    assert len(scores) == 16 and len(selected) == 2
    tok, model = reference
    for s in scores:
        row = rows[s["row"]]
        mean, n = direct(tok, model, row["instruction"], row["output"])
        assert s["n_tokens"] == n
        assert abs(s["score"] - mean) < 1e-4, (s, mean)
    for group in ("ae-000", "ae-001"):
        winner = max((s for s in scores if s["group"] == group), key=lambda s: s["score"])
        assert winner["selected"] and rows[winner["row"]] in selected


def test_exported_folder_scores_like_the_gguf(smollm2_dir, tmp_path):
    from grape_plugin.models import load_model
    from grape_plugin.render import paper_renderer
    from grape_plugin.scoring import TransformersScorer

    row = pool_rows(1)[0]
    prompt = [{"role": "user", "content": row["instruction"]}]
    results = []
    for name in (None, str(smollm2_dir)):
        loaded = load_model(name, device="cpu", dtype="fp32")
        assert loaded.tokenizer.eos_token == "<|im_end|>"
        item = render_pair(paper_renderer(loaded.tokenizer), prompt, row["output"][:500])
        results.append(TransformersScorer(loaded.as_spec()).score([item])[0])
    assert results[0].n_tokens == results[1].n_tokens
    assert abs(results[0].mean - results[1].mean) < 1e-5
