"""Render (prompt, response) into token ids with the exact span of response tokens.

Convention, used by every built-in template: the whole text (prompt + response) is tokenised once, and
the response span is the run of tokens whose character offsets overlap the response's characters in that
text. The scored ids are the ids the model sees; no substring is ever re-tokenised. The first response
token may carry the separator before it (BPE merges " Hello" into one token). Tokens after the response
(EOS, a chat template's end-of-turn) are not scored, as in the paper.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from .errors import GrapeError, input_error
from .hookspecs import hookimpl
from .records import Candidate, Drops, Group, Message, Reason


@dataclass(frozen=True, eq=False)
class Rendered:
    """Token ids (an int32 numpy array; any sequence of ints given is converted) and the half-open span
    ``[start, end)`` of response tokens within them."""

    input_ids: Any
    start: int
    end: int

    def __post_init__(self) -> None:
        import numpy as np

        if not (isinstance(self.input_ids, np.ndarray) and self.input_ids.dtype == np.int32):
            object.__setattr__(self, "input_ids", np.asarray(self.input_ids, dtype=np.int32))

    def __eq__(self, other: object) -> bool:
        import numpy as np

        return isinstance(other, Rendered) and (self.start, self.end) == (other.start, other.end) and bool(
            np.array_equal(self.input_ids, other.input_ids))  # fmt: skip

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


Renderer = Callable[[Group, Candidate], Rendered]  # a template may also offer ``render_many`` (see TextRenderer)
RenderedKey = tuple[str, int]  # (group key, candidate index)
RENDER_BATCH = 1024  # candidates per tokenizer call of a template that renders in bulk
Text = tuple[str, int, int]  # a whole text and the character span of the response in it
G = TypeVar("G")  # a group or its outline


def render_texts(tokenizer: Any, texts: Sequence[Text], add_special_tokens: bool) -> list[Rendered]:
    """Tokenise many texts in one call; each response is every token overlapping its character span."""
    import numpy as np

    enc = tokenizer([t for t, _, _ in texts], add_special_tokens=add_special_tokens, return_attention_mask=False,
                    return_token_type_ids=False)  # fmt: skip
    encodings = getattr(enc, "encodings", None)
    if encodings is None:
        raise GrapeError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets; a fast (Rust) tokenizer is needed"
        )
    out = []
    for ids, encoding, (_, char_start, char_end) in zip(enc["input_ids"], encodings, texts):
        span = encoding_span(encoding, char_start, char_end) or offsets_span(encoding.offsets, char_start, char_end)
        out.append(Rendered(np.array(ids, dtype=np.int32), *span))
    return out


def offsets_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """The response span by definition: first to last non-empty token overlapping ``[char_start, char_end)``."""
    import numpy as np

    at = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    span = np.flatnonzero((at[:, 1] > at[:, 0]) & (at[:, 1] > char_start) & (at[:, 0] < char_end))
    if not len(span):
        raise GrapeError("the response rendered to no tokens")
    return int(span[0]), int(span[-1]) + 1


def encoding_span(encoding: Any, char_start: int, char_end: int) -> Optional[tuple[int, int]]:
    """``offsets_span`` read from a Rust ``Encoding`` without converting its offsets: the tokens holding the first and
    the last response character, widened over neighbours that overlap too (the byte pieces of one character share its
    offsets). Exact when non-empty tokens' offsets never go backwards; None when a boundary character is in no token."""
    if char_end <= char_start:
        return None
    first, last = encoding.char_to_token(char_start), encoding.char_to_token(char_end - 1)
    if first is None or last is None:
        return None

    def widen(token: int, step: int) -> int:  # past empty tokens, up to the nearest non-empty one not overlapping
        probe = token + step
        while 0 <= probe < len(encoding):
            chars = encoding.token_to_chars(probe)
            if chars is not None and chars[0] < chars[1]:
                if chars[1] <= char_start or chars[0] >= char_end:
                    break
                token = probe
            probe += step
        return token

    return widen(first, -1), widen(last, 1) + 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything a tokenizer's output depends on: its whole definition (vocabulary, merges, normaliser,
    special tokens) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}\n{getattr(tokenizer, 'chat_template', None)}\n{tokenizer.special_tokens_map}"
    return hashlib.sha256(f"{definition}\n{extra}".encode()).hexdigest()[:24]


class TextRenderer:
    """A template that turns a candidate into one text (``text(group, candidate)``) and tokenises many texts per
    tokenizer call (``render_many``); called on one candidate, it is a plain ``Renderer``.

    ``key`` identifies what its token ids depend on (the template, the tokenizer, this release's code), so that a
    candidate's cached outcome is found before it is rendered; a host's renderer may offer one too."""

    def __init__(self, tokenizer: Any, text: Callable[[Group, Candidate], Text], add_special_tokens: bool, name: str):
        self.tokenizer, self.text, self.add_special_tokens, self.name = tokenizer, text, add_special_tokens, name

    @cached_property
    def key(self) -> str:
        from .version import __version__

        return f"{self.name}:{__version__}:{self.add_special_tokens}:{tokenizer_fingerprint(self.tokenizer)}"

    def __call__(self, group: Group, cand: Candidate) -> Rendered:
        return self.render_many([(group, cand)])[0]

    def render_many(self, pairs: Sequence[tuple[Group, Candidate]]) -> list[Rendered]:
        return render_texts(self.tokenizer, [self.text(g, c) for g, c in pairs], self.add_special_tokens)


def paper_prompt(prompt: Iterable[Message]) -> str:
    """The paper's ``Question: {instruction}\\nAnswer: `` (earlier turns and a system message come first)."""
    lines = []
    for msg in prompt:
        label = {"system": "", "user": "Question: ", "assistant": "Answer: "}[msg["role"]]
        lines.append(label + msg["content"])
    return "\n".join(lines) + "\nAnswer: "


def paper_renderer(tokenizer: Any, cfg: Any = None) -> TextRenderer:
    """The paper's template: ``Question: {instruction}\\nAnswer: {response}``, with the tokenizer's BOS."""

    def text(group: Group, cand: Candidate) -> Text:
        head = paper_prompt(group.prompt)
        return head + cand.response, len(head), len(head) + len(cand.response)

    return TextRenderer(tokenizer, text, True, "paper")


def chat_renderer(tokenizer: Any, cfg: Any = None) -> TextRenderer:
    """The tokenizer's own chat template; the response is located inside the rendered conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise GrapeError("--template chat: the model's tokenizer has no chat template; use --template paper")

    def text(group: Group, cand: Candidate) -> Text:
        prompt, response = list(group.prompt), cand.response
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        begin = len(head) if whole.startswith(head) else 0
        for needle in (response, response.strip()):
            at = whole.find(needle, begin)
            if at >= 0:
                return whole, at, at + len(needle)
        raise GrapeError("the chat template changed the response text; cannot locate it to score")

    return TextRenderer(tokenizer, text, False, "chat")


IGNORE_INDEX = -100  # the label of positions a host does not train on (Axolotl, LLaMA-Factory, HF)


def labelled_span(input_ids: Sequence[int], labels: Sequence[int]) -> Rendered:
    """A host's own tokens, scored on its last contiguous run of labelled positions (``labels[p]`` is token ``p``).

    That run is the final response as the host trains on it (with its end-of-turn tokens, if it labels them).
    """
    end = next((p + 1 for p in range(len(labels) - 1, -1, -1) if labels[p] != IGNORE_INDEX), None)
    if end is None:
        raise GrapeError("the host labels no token of this row (nothing would be trained on)")
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:
        raise GrapeError("the host labels the whole row; no prompt token to condition the response on")
    return Rendered(tuple(input_ids), start, end)


def fit_length(
    item: Rendered, max_length: Optional[int], policy: str, cut: Optional[Callable[[], Optional[Rendered]]] = None
) -> Optional[Rendered]:
    """Apply ``max_length``: ``drop`` returns None for a long sequence, ``truncate`` cuts the response, or makes
    ``cut()`` (a host renderer's own truncation, None where it loses the response) when there is one."""
    if max_length is None or len(item.input_ids) <= max_length:
        return item
    if policy != "truncate":
        return None
    if cut is not None:
        short = cut()
        return short if short is not None and len(short.input_ids) <= max_length else None
    if item.start < max_length:
        return Rendered(item.input_ids[:max_length].copy(), item.start, min(item.end, max_length))
    return None


def render_one(render: Renderer, prompt: Iterable[Message], response: str) -> Rendered:
    """``render`` applied to one prompt and one response, outside any dataset (benchmarks, notebooks)."""
    cand = Candidate(response, None, 0)
    return render(Group("", tuple(prompt), (cand,)), cand)


@dataclass(frozen=True)
class RenderedGroups:
    """Groups with only the candidates that fit ``max_length``, their token ids and spans, and what was dropped."""

    groups: tuple[Group, ...]
    items: dict[RenderedKey, Rendered]
    drops: Drops
    truncated: int
    cut: frozenset[RenderedKey] = field(default_factory=frozenset)  # the truncated candidates (this rank's)


def render_pairs(render: Renderer, pairs: Sequence[tuple[Group, Candidate]], file: str) -> list[Rendered]:
    """Every (group, candidate) rendered: many per call when the template offers ``render_many``; an error names
    the candidate's row."""
    many = getattr(render, "render_many", None)
    if many is not None:
        try:
            return many(pairs)
        except GrapeError:
            pass  # one of them is bad: render them one by one to name it
    out = []
    for group, cand in pairs:
        try:
            out.append(render(group, cand))
        except GrapeError as exc:
            raise input_error(file, cand.row, "response", str(exc)) from None
    return out


def group_chunks(groups: Iterable[G], candidates: int) -> Iterator[list[G]]:
    """Whole groups, about ``candidates`` candidates at a time."""
    chunk: list[G] = []
    size = 0
    for group in groups:
        chunk.append(group)
        size += len(group.candidates)
        if size >= candidates:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def render_groups(
    groups: Iterable[Group], render: Renderer, max_length: Optional[int], over_length: str, file: str = "input"
) -> RenderedGroups:
    """Render every candidate; apply ``max_length`` (drop or truncate, counted); leave out emptied groups."""
    items: dict[RenderedKey, Rendered] = {}
    kept, candidates, instructions, cut = [], Counter(), Counter(), set()
    own_cut = getattr(render, "cut", None)
    for chunk in group_chunks(groups, RENDER_BATCH):
        rendered = iter(render_pairs(render, [(g, c) for g in chunk for c in g.candidates], file))
        for group in chunk:
            survivors = []
            for cand in group.candidates:
                item = next(rendered)
                fitted = fit_length(item, max_length, over_length, own_cut and partial(own_cut, group, cand))
                if fitted is None:
                    candidates[Reason.TOO_LONG] += 1
                    continue
                if fitted is not item:
                    cut.add((group.key, cand.index))
                items[(group.key, cand.index)] = fitted
                survivors.append(cand)
            if survivors:
                kept.append(group.with_candidates(survivors))
            else:
                instructions[Reason.ALL_CANDIDATES_TOO_LONG] += 1
    return RenderedGroups(tuple(kept), items, Drops.of(candidates, instructions), len(cut), frozenset(cut))


@hookimpl
def grape_register_renderers(register: Callable[[str, Callable[..., Renderer]], None]) -> None:
    register("paper", paper_renderer)
    register("chat", chat_renderer)
