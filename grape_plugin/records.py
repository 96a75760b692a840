"""The records every stage passes on: instructions (groups) of candidates, scores, drops, run statistics and the
selection. Plain, immutable data: a stage returns new records and never edits the ones it was given."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class Placed:
    """Where a candidate stands in the input (``part``, ``row``, ``item``), for its outline and its loaded form."""

    __slots__ = ()

    @property
    def origin(self) -> tuple[int, int, int]:
        """Input order: (part, row, item)."""
        return self.part, self.row, -1 if self.item is None else self.item  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Candidate(Placed):
    """One response to an instruction, and where it stands in the input.

    ``part`` is the input it came from (0 for a single file; an Axolotl ``datasets:`` entry or a LLaMA-Factory
    dataset otherwise), ``row`` its 0-based row there and ``item`` its place inside the row (a list column's
    position, 0 for ``chosen`` and 1 for ``rejected``), None when the row is the candidate.
    """

    response: str
    source: Optional[str]
    row: int
    index: int = 0  # position within its group, in input order
    part: int = 0
    item: Optional[int] = None
    digest: bytes = b""  # of the response (``text_digest``)
    chars: int = 0  # characters of its prompt and response: what rendering it costs, before it is rendered


@dataclass(frozen=True, slots=True)
class CandidateOutline(Placed):
    """A candidate without its text, as the pipeline carries it until the text is needed: where it is in the input
    (``Candidate``'s fields), ``digest`` (``text_digest`` of its response) and ``chars`` standing for the text."""

    source: Optional[str]
    row: int
    index: int = 0
    part: int = 0
    item: Optional[int] = None
    digest: bytes = b""
    chars: int = 0

    def with_text(self, response: str) -> Candidate:
        return Candidate(response, self.source, self.row, self.index, self.part, self.item, self.digest, self.chars)


@dataclass(frozen=True, slots=True)
class GroupOutline:
    """An instruction without its texts: its key, the hash of its prompt and context (``prompt_key``), its first
    input row and its candidates' outlines. ``Grouped.load`` turns outlines into ``Group``s."""

    key: str
    candidates: tuple[CandidateOutline, ...] = ()
    row: int = 0
    prompt_hash: str = ""

    def with_candidates(self, candidates: Iterable[CandidateOutline]) -> "GroupOutline":
        return replace(self, candidates=tuple(candidates))

    def with_texts(self, prompt: Iterable[Message], context: Mapping[str, Any], responses: Iterable[str]) -> "Group":
        """The loaded instruction: this outline with its prompt, context and each candidate's response."""
        cands = tuple(c.with_text(r) for c, r in zip(self.candidates, responses))
        return Group(self.key, tuple(prompt), cands, self.row, context, self.prompt_hash)


@dataclass(frozen=True, slots=True)
class Group:
    """One instruction: its prompt as chat messages and its candidate responses.

    ``context`` holds what a host's own form of the prompt adds to the messages (LLaMA-Factory's system, tools
    and media); it is part of the group key, so prompts that differ there are different instructions.
    """

    key: str
    prompt: tuple[Message, ...]
    candidates: tuple[Candidate, ...] = ()
    row: int = 0  # first input row of the group
    context: Mapping[str, Any] = field(default_factory=dict)
    prompt_hash: str = ""  # ``prompt_key(prompt, context)``

    def with_candidates(self, candidates: Iterable[Candidate]) -> "Group":
        return replace(self, candidates=tuple(candidates))


class Draft(NamedTuple):
    """What a format reads from one row: a prompt, one candidate and the host's prompt context."""

    prompt: list[Message]
    candidate: Candidate
    context: Mapping[str, Any] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)


def prompt_key(prompt: Iterable[Message], context: Optional[Mapping[str, Any]] = None) -> str:
    """A stable key for a prompt: the same text gives the same key in every run, rank and host."""
    value: Any = list(prompt) if not context else [list(prompt), dict(context)]
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return "p:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def text_digest(text: str) -> bytes:
    """16 bytes that identify a response's text."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


@dataclass(frozen=True, slots=True)
class Score:
    """Sum of response-token log-probabilities and their count (``mean`` is GRAPE's score), and optionally each
    response token's log-probability (float32) and rank (int32: how many vocabulary entries have a strictly higher
    logit), as little-endian bytes: compact, picklable and comparable. ``logprob_sum`` is the exact fp64 sum."""

    logprob_sum: float
    n_tokens: int
    token_logprobs: Optional[bytes] = field(default=None, repr=False)
    token_ranks: Optional[bytes] = field(default=None, repr=False)

    @classmethod
    def of(cls, logprob_sum: float, n_tokens: int, logprobs: Any = None, ranks: Any = None) -> "Score":
        """A score with its per-token arrays (anything numpy can read, or None)."""
        import numpy as np

        pack = lambda a, t: None if a is None else np.asarray(a, dtype=t).tobytes()  # noqa: E731
        return cls(float(logprob_sum), int(n_tokens), pack(logprobs, "<f4"), pack(ranks, "<i4"))

    @property
    def mean(self) -> float:
        return self.logprob_sum / self.n_tokens

    @property
    def logprobs(self) -> Any:
        """Per-token log-probabilities (a float32 numpy array), or None when they were not kept."""
        import numpy as np

        return None if self.token_logprobs is None else np.frombuffer(self.token_logprobs, dtype="<f4")

    @property
    def ranks(self) -> Any:
        """Per-token ranks (an int32 numpy array; 0 = the model's top choice), or None when not kept."""
        import numpy as np

        return None if self.token_ranks is None else np.frombuffer(self.token_ranks, dtype="<i4")

    def without_tokens(self) -> "Score":
        return Score(self.logprob_sum, self.n_tokens)


class Reason(str, Enum):
    """Why a candidate or an instruction was dropped: the keys ``Drops`` counts them under (rows skipped by
    ``on_bad_row: skip`` are counted by the field and problem that made them unreadable instead)."""

    DUPLICATE_RESPONSE = "duplicate_response"  # the same text as an earlier candidate of its instruction
    NO_VALID_CANDIDATE = "no_valid_candidate"
    TOO_FEW_CANDIDATES = "too_few_candidates"  # fewer distinct responses than min_candidates
    TOO_LONG = "too_long"  # longer than max_length (over_length: drop)
    ALL_CANDIDATES_TOO_LONG = "all_candidates_too_long"
    NOT_SELECTED = "not_selected"
    OVER_BUDGET = "over_budget"
    OVER_MAX_SAMPLES = "over_max_samples"  # a host's cap on rows (LLaMA-Factory's max_samples)
    INVALID_EXAMPLE = "invalid_example"  # a row the host's own reader would drop


@dataclass(frozen=True)
class Drops:
    """What was dropped, by reason: candidates, whole instructions, and input rows skipped (``on_bad_row: skip``)."""

    candidates: Mapping[str, int] = field(default_factory=dict)
    instructions: Mapping[str, int] = field(default_factory=dict)
    rows: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        candidates: Optional[Mapping[str, int]] = None,
        instructions: Optional[Mapping[str, int]] = None,
        rows: Optional[Mapping[str, int]] = None,
    ) -> "Drops":
        """From counters (keyed by ``Reason`` or, for rows, by the problem); zero counts are left out."""
        keep = lambda c: dict(sorted((getattr(k, "value", k), v) for k, v in (c or {}).items() if v))  # noqa: E731
        return cls(keep(candidates), keep(instructions), keep(rows))

    def __add__(self, other: "Drops") -> "Drops":
        add = lambda a, b: Counter(a) + Counter(b)  # noqa: E731
        return Drops.of(add(self.candidates, other.candidates), add(self.instructions, other.instructions),
                        add(self.rows, other.rows))  # fmt: skip

    @property
    def n_candidates(self) -> int:
        return sum(self.candidates.values())

    @property
    def n_instructions(self) -> int:
        return sum(self.instructions.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"candidates": dict(self.candidates), "instructions": dict(self.instructions), "rows": dict(self.rows)}


Loader = Callable[[Sequence[GroupOutline]], tuple[Group, ...]]  # outlines -> the same groups with their texts


@dataclass(frozen=True)
class Grouped:
    """Groups read from the input, with what reading them dropped.

    The groups are outlines: keys, digests and where each candidate is in the input, without the texts, so that a
    pool of any size fits in memory; ``load`` reads the texts of a few groups back from the input when they are
    needed (to render them, to write the kept rows)."""

    groups: tuple[GroupOutline, ...]
    drops: Drops = Drops()
    skipped: tuple[str, ...] = ()  # the first skipped rows' messages
    load: Loader = tuple  # groups that already hold their texts (``Group``s, in tests and notebooks) need none
    reading: tuple[str, ...] = ()  # per input: its shape and the columns read


CandidateKey = tuple[str, int]  # (group key, candidate index)


@dataclass(frozen=True)
class Results:
    """Every scored candidate of a run in one columnar table: row ``i`` is candidate ``(group[i], index[i])``, its
    score (``logprob_sum`` over ``n_tokens``; the per-token arrays when kept) and its ``fit`` under the run's
    metric. Compact (a few numbers per candidate, picklable as a handful of arrays to gather across ranks) and
    read through ``score(key)`` / ``fit_of(key)``, or ``scores`` / ``fits`` as mappings."""

    group: tuple[str, ...] = ()
    index: array = field(default_factory=lambda: array("i"))
    logprob_sum: array = field(default_factory=lambda: array("d"))
    n_tokens: array = field(default_factory=lambda: array("i"))
    fit: array = field(default_factory=lambda: array("d"))
    token_logprobs: tuple[Optional[bytes], ...] = ()
    token_ranks: tuple[Optional[bytes], ...] = ()

    @classmethod
    def of(cls, rows: Iterable[tuple[CandidateKey, Score, float]]) -> "Results":
        """A table from (candidate, score, fit) rows."""
        rows = list(rows)
        return cls(tuple(k[0] for k, _, _ in rows), array("i", (k[1] for k, _, _ in rows)),
                   array("d", (s.logprob_sum for _, s, _ in rows)), array("i", (s.n_tokens for _, s, _ in rows)),
                   array("d", (f for _, _, f in rows)), tuple(s.token_logprobs for _, s, _ in rows),
                   tuple(s.token_ranks for _, s, _ in rows))  # fmt: skip

    def __add__(self, other: "Results") -> "Results":
        return Results(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __len__(self) -> int:
        return len(self.group)

    def keys(self) -> Iterator[CandidateKey]:
        return zip(self.group, self.index)

    def rows(self) -> Iterator[tuple[CandidateKey, Score, float]]:
        """(candidate, score, fit) per row."""
        for i, key in enumerate(self.keys()):
            yield key, Score(self.logprob_sum[i], self.n_tokens[i], self.token_logprobs[i], self.token_ranks[i]), self.fit[i]

    @cached_property
    def scores(self) -> dict[CandidateKey, Score]:
        """Each scored candidate's score, by candidate."""
        return {key: score for key, score, _ in self.rows()}

    @cached_property
    def fits(self) -> dict[CandidateKey, float]:
        """Each scored candidate's fit, by candidate."""
        return dict(zip(self.keys(), self.fit))

    def score(self, key: CandidateKey) -> Optional[Score]:
        return self.scores.get(key)

    def fit_of(self, key: CandidateKey) -> Optional[float]:
        return self.fits.get(key)


@dataclass(frozen=True)
class Share:
    """What one rank did for its instructions: the survivors of ``max_length`` (outlines), the results of the scored
    candidates, what rendering dropped, and counts."""

    groups: list[GroupOutline] = field(default_factory=list)
    results: Results = Results()
    drops: Drops = Drops()
    truncated: int = 0
    scored: int = 0  # candidates scored by this rank in this run
    cached: int = 0  # candidates whose score came from the cache
    tokens_scored: int = 0
    tokens: int = 0  # of its candidates after max_length

    @property
    def counts(self) -> tuple[int, ...]:
        """The counts, in field order (they add up across chunks and ranks)."""
        return self.truncated, self.scored, self.cached, self.tokens_scored, self.tokens


@dataclass(frozen=True)
class Stats:
    """What a run did: counts read, truncated, scored afresh or from the cache, and how long it took."""

    instructions: int = 0  # read
    candidates: int = 0  # read
    truncated: int = 0  # kept with their response cut at max_length
    scored: int = 0  # candidates scored in this run (all ranks)
    cached: int = 0  # candidates whose score came from the cache
    tokens_scored: int = 0
    tokens: int = 0  # of every candidate kept after max_length (all ranks)
    tokens_here: int = 0  # of the candidates rendered on this rank
    scored_by_this_rank: int = 0
    model_loaded: bool = False  # on this rank
    seconds: float = 0.0
    stages: Mapping[str, float] = field(default_factory=dict)  # seconds per stage: render, load, score, gather, select

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Selection:
    """Scores, kept candidates and the ledger of one run. ``groups`` are as scored (too-long candidates gone)."""

    groups: tuple[GroupOutline, ...]
    results: Results  # every scored candidate's score and fit under ``metric``
    kept: Mapping[str, tuple[int, ...]]  # group key -> kept candidate indices, best first
    drops: Drops = Drops()
    stats: Stats = field(default_factory=Stats)
    skipped: tuple[str, ...] = ()  # the first skipped rows' messages
    metric: str = "mean"  # what candidates were compared by
    load: Loader = tuple  # the texts of outlines (``Grouped.load``)
    made_by: Mapping[str, Any] = field(default_factory=dict)  # grape-plugin's version, the model, template, options
    reading: tuple[str, ...] = ()  # per input: its shape and the columns read (``Grouped.reading``)

    @property
    def scores(self) -> Mapping[CandidateKey, Score]:
        return self.results.scores

    @property
    def fits(self) -> Mapping[CandidateKey, float]:
        return self.results.fits

    def picks(self) -> list[tuple[GroupOutline, CandidateOutline]]:
        """Every kept (group, candidate), in the order of ``kept``, as outlines (no texts)."""
        by_key = {g.key: (g, {c.index: c for c in g.candidates}) for g in self.groups if g.key in self.kept}
        return [(by_key[k][0], by_key[k][1][i]) for k, idx in self.kept.items() for i in idx]

    def picks_in_order(self, texts: bool = False, chunk: int = 4096) -> Iterator[tuple[Any, Any]]:
        """Every kept (group, candidate) in input order (``Candidate.origin``), as outlines; with ``texts``, loaded
        (``Group``, ``Candidate``: their prompts and responses, read back ``chunk`` at a time, so that writing a
        selection never holds all of them)."""
        ordered = sorted(self.picks(), key=lambda p: p[1].origin)
        for at in range(0, len(ordered), chunk):
            part = ordered[at : at + chunk]
            if texts:
                part = [(g, g.candidates[0]) for g in self.load([g.with_candidates((c,)) for g, c in part])]
            yield from part

    def capped(self, limits: Sequence[Optional[int]], reason: Reason) -> "Selection":
        """At most ``limits[part]`` kept candidates from each input part (None: no cap), by whole instructions in the
        order of ``kept``: an instruction that would pass a part's cap is dropped whole, counted under ``reason``."""
        per_group: dict[str, Counter] = {}
        for group, cand in self.picks():
            per_group.setdefault(group.key, Counter())[cand.part] += 1
        rows, over = Counter(), []
        for key, parts in per_group.items():
            if any(limits[p] is not None and rows[p] + n > limits[p] for p, n in parts.items()):
                over.append(key)
            else:
                rows += parts
        return self.dropping(over, reason)

    def dropping(self, keys: Iterable[str], reason: Reason) -> "Selection":
        """The same selection without the instructions ``keys``, counted under ``reason``."""
        gone = set(keys) & set(self.kept)
        lost = Drops.of({reason: sum(len(self.kept[k]) for k in gone)}, {reason: len(gone)})
        kept = {k: v for k, v in self.kept.items() if k not in gone}
        return replace(self, kept=kept, drops=self.drops + lost)
