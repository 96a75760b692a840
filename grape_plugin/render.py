"""Render (prompt, response) into token ids with the exact span of response tokens.

Convention, used by every built-in template: the whole text (prompt + response) is tokenised once, and
the response span is the run of tokens whose character offsets overlap the response's characters in that
text. The scored ids are the ids the model sees; no substring is ever re-tokenised. The first response
token may carry the separator before it (BPE merges " Hello" into one token). Tokens after the response
(EOS, a chat template's end-of-turn) are not scored, as in the paper.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from .errors import GrapeError, input_error
from .hookspecs import hookimpl
from .records import Candidate, Drops, Group, Message


@dataclass(frozen=True)
class Rendered:
    """Token ids and the half-open span ``[start, end)`` of response tokens within them."""

    input_ids: tuple[int, ...]
    start: int
    end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


Renderer = Callable[[Group, Candidate], Rendered]
RenderedKey = tuple[str, int]  # (group key, candidate index)


def render_text(tokenizer: Any, text: str, char_start: int, char_end: int, add_special_tokens: bool) -> Rendered:
    """Tokenise ``text`` once; the response is every token overlapping ``text[char_start:char_end]``."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise GrapeError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets; a fast (Rust) tokenizer is needed"
        ) from None
    span = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > char_start and a < char_end]
    if not span:
        raise GrapeError("the response rendered to no tokens")
    return Rendered(tuple(enc["input_ids"]), span[0], span[-1] + 1)


def paper_prompt(prompt: Iterable[Message]) -> str:
    """The paper's ``Question: {instruction}\\nAnswer: `` (earlier turns and a system message come first)."""
    lines = []
    for msg in prompt:
        label = {"system": "", "user": "Question: ", "assistant": "Answer: "}[msg["role"]]
        lines.append(label + msg["content"])
    return "\n".join(lines) + "\nAnswer: "


def paper_renderer(tokenizer: Any, cfg: Any = None) -> Renderer:
    """The paper's template: ``Question: {instruction}\\nAnswer: {response}``, with the tokenizer's BOS."""

    def render(group: Group, cand: Candidate) -> Rendered:
        head = paper_prompt(group.prompt)
        return render_text(tokenizer, head + cand.response, len(head), len(head) + len(cand.response), True)

    return render


def chat_renderer(tokenizer: Any, cfg: Any = None) -> Renderer:
    """The tokenizer's own chat template; the response is located inside the rendered conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise GrapeError("--template chat: the model's tokenizer has no chat template; use --template paper")

    def render(group: Group, cand: Candidate) -> Rendered:
        prompt, response = list(group.prompt), cand.response
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        begin = len(head) if text.startswith(head) else 0
        for needle in (response, response.strip()):
            at = text.find(needle, begin)
            if at >= 0:
                return render_text(tokenizer, text, at, at + len(needle), False)
        raise GrapeError("the chat template changed the response text; cannot locate it to score")

    return render


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


def fit_length(item: Rendered, max_length: Optional[int], policy: str) -> Optional[Rendered]:
    """Apply ``max_length``: ``drop`` returns None for a long sequence, ``truncate`` cuts the response."""
    if max_length is None or len(item.input_ids) <= max_length:
        return item
    if policy == "truncate" and item.start < max_length:
        return Rendered(item.input_ids[:max_length], item.start, min(item.end, max_length))
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


def render_groups(
    groups: Iterable[Group], render: Renderer, max_length: Optional[int], over_length: str, file: str = "input"
) -> RenderedGroups:
    """Render every candidate; apply ``max_length`` (drop or truncate, counted); leave out emptied groups."""
    items: dict[RenderedKey, Rendered] = {}
    kept, candidates, instructions, truncated = [], Counter(), Counter(), 0
    for group in groups:
        survivors = []
        for cand in group.candidates:
            try:
                item = render(group, cand)
            except GrapeError as exc:
                raise input_error(file, cand.row, "response", str(exc)) from None
            fitted = fit_length(item, max_length, over_length)
            if fitted is None:
                candidates["too_long"] += 1
                continue
            truncated += fitted is not item
            items[(group.key, cand.index)] = fitted
            survivors.append(cand)
        if survivors:
            kept.append(group.with_candidates(survivors))
        else:
            instructions["all_candidates_too_long"] += 1
    return RenderedGroups(tuple(kept), items, Drops.of(candidates, instructions), truncated)


@hookimpl
def grape_register_renderers(register: Callable[[str, Callable[..., Renderer]], None]) -> None:
    register("paper", paper_renderer)
    register("chat", chat_renderer)
