"""Input shapes: read rows into groups of candidates, and write a selection back in the input's shape.

Every shape turns a row into drafts: a prompt as chat messages and one candidate. The prompt is everything before
the response: the system turn, every earlier turn of a conversation, and a context/input field. Drafts are grouped
into instructions by ``group_by``: by default an ``id`` column groups only when its ids repeat (many datasets give
every row its own id), otherwise the exact prompt does, so pooled data (one row per instruction and generator),
pairs from several rows that share a prompt and data with a list of candidates per row end up the same way.
Dialogue text ("Human: ... Assistant: ...", as in HH-RLHF and Nectar) is read as chat turns.

Where several shapes fit the columns, the one that reads the most candidates from the first row wins (ties: the
registration order); a column option (``--candidates-column`` ...) keeps only the shapes that read it.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from .config import GrapeConfig
from .errors import SKIP_HINT, GrapeError, RowError, input_error
from .hookspecs import hookimpl
from .records import (
    Candidate, CandidateOutline, Draft, Drops, Group, Grouped, GroupOutline, Loader, Message, Reason, prompt_key,
    text_digest,
)

PROMPT_COLUMNS = ("instruction", "prompt", "question", "query", "history")  # SHP keeps its post in ``history``
CONTEXT_COLUMNS = ("input", "context")  # Alpaca's input, Dolly's context: part of the instruction
SYSTEM_COLUMNS = ("system", "system_prompt")
HISTORY_COLUMN = "history"  # LLaMA-Factory's alpaca history: [[instruction, response], ...] before the prompt
RESPONSE_COLUMNS = ("output", "response", "completion", "answer")
SOURCE_COLUMNS = ("generator", "source", "model")
LIST_COLUMNS = ("responses", "candidates", "outputs", "completions", "answers", "generations")
MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
ITEM_TEXT_FIELDS = ("response", "answer", "text", "content", "output", "completion")  # in a list of objects
ITEM_SOURCE_FIELDS = ("model", "source", "generator")
SOURCE_LISTS = ("models", "generators", "sources", "generation_models")  # a list of strings' sources, by position
PAIR = ("chosen", "rejected")
# one column per candidate: response_0, response_1 (PKU-SafeRLHF), human_ref_A/B (SHP), conversation_a/b (Arena)
SLOT = re.compile(r"^(response|output|completion|answer|generation|human_ref|conversation)_(\d+|[A-Za-z])$")
SLOT_SOURCES = ("{col}_source", "{col}-source", "{col}_model", "{col}-model", "{col}_generator", "model_{tag}",
                "generator_{tag}", "source_{tag}")  # fmt: skip
TREE_COLUMNS = ("message_id", "parent_id", "role", "text")  # OpenAssistant's message trees, one row per message
COLUMN_OPTIONS = ("prompt_column", "context_column", "system_column", "response_column", "candidates_column",
                  "source_column")  # fmt: skip
PROMPT_OPTIONS = frozenset({"prompt_column", "context_column", "system_column"})
ADDED_RESPONSE, ADDED_SOURCE = "grape_response", "grape_source"  # columns a selection adds to a list's rows
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system",
                "prompter": "user"}  # fmt: skip
DIALOGUE_TURN = re.compile(r"\n\n(Human|Assistant):")
ASSISTANT_MARK = "\n\nAssistant:"
SKIP_EXAMPLES = 5  # skipped rows named in the report


def flag(option: str) -> str:
    """The command-line flag of a ``GrapeConfig`` field."""
    return "--" + option.replace("_", "-")


def named_options(cfg: GrapeConfig) -> list[str]:
    """The column options the user set."""
    return [o for o in COLUMN_OPTIONS if getattr(cfg, o) is not None]


@dataclass
class Context:
    """What a format needs to turn one row into candidates; ``state`` is what ``Format.prepared`` read from all rows."""

    file: str
    columns: list[str]
    cfg: GrapeConfig
    state: Any = None
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # what depends on the columns only

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, made once per context: a column lookup is the same for every row."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def first(self, names: tuple[str, ...], override: Optional[str] = None, option: str = "") -> Optional[str]:
        """The column the user named (with ``option``), else the first of ``names`` present in the data."""
        if override is not None:
            if override not in self.columns:
                raise GrapeError(f"{self.file}: {option + ' ' if option else ''}{override}: no such column; "
                                 f"its columns are {', '.join(self.columns)}")  # fmt: skip
            return override
        return next((c for c in names if c in self.columns), None)

    def column(self, option: str, names: tuple[str, ...] = ()) -> Optional[str]:
        """The column named with ``option`` (a ``GrapeConfig`` field) when the data has it, else the first of
        ``names`` present; None when the option names a missing column (``Format.check`` says so)."""
        if (option, names) not in self.memo:
            named = getattr(self.cfg, option)
            found = self.first(names) if named is None else named if named in self.columns else None
            self.memo[(option, names)] = found
        return self.memo[(option, names)]

    def text(self, row: dict, i: int, field: str, optional: bool = False) -> str:
        """A non-empty string field, or a clear error naming file, row and field."""
        value = row.get(field)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
            raise input_error(self.file, i, field, f"is {kind}")
        if not value.strip() and not optional:
            raise input_error(self.file, i, field, "is empty")
        return value


def parse_dialogue(text: str) -> Optional[list[Message]]:
    """"\n\nHuman: ...\n\nAssistant: ..." as chat messages (None when ``text`` is not such a transcript). A trailing
    empty "Assistant:" (a prompt waiting for its answer) is left out."""
    body = "\n\n" + text.lstrip("\n")
    if not body.startswith("\n\nHuman:") or ASSISTANT_MARK not in body:
        return None
    parts = DIALOGUE_TURN.split(body)[1:]
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[::2], parts[1::2])]  # fmt: skip
    return turns[:-1] if turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns


def fields(value: dict) -> str:
    return "{" + ", ".join(map(str, value)) + "}"


def turn_messages(turn: Any, i: int, field: str, ctx: Context) -> list[tuple[Any, Any]]:
    """One turn as (role, content) pairs: role/content (OpenAI), from/value (ShareGPT), or an {input, output}
    exchange (Capybara), which is a user turn and its answer."""
    if not isinstance(turn, dict):
        raise input_error(ctx.file, i, field, "must be a message object")
    if "role" in turn or "from" in turn:
        return [(turn.get("role", turn.get("from")), turn.get("content", turn.get("value")))]
    if "input" in turn and "output" in turn:
        return [("user", turn["input"]), ("assistant", turn["output"])]
    # the data's shape, not one bad row: not skippable
    raise GrapeError(str(input_error(ctx.file, i, field, f"turns are {fields(turn)} objects; chat turns need "
                                                         "role/content, from/value or input/output fields")))


def parse_messages(turns: Any, i: int, field: str, ctx: Context) -> list[Message]:
    """Chat turns (see ``turn_messages``) as validated chat messages."""
    if not isinstance(turns, list) or not turns:
        raise input_error(ctx.file, i, field, "must be a non-empty list of messages")
    messages: list[Message] = []
    for t, turn in enumerate(turns):
        where = f"{field}[{t}]"
        for name, content in turn_messages(turn, i, where, ctx):
            role = ROLE_ALIASES.get(name)
            if role is None:
                raise input_error(ctx.file, i, where, f"unknown role {name!r}")
            if not isinstance(content, str):
                raise input_error(ctx.file, i, where, "content must be a string")
            if role == "system" and messages:
                raise input_error(ctx.file, i, where, "a system message may only come first")
            if messages and role != "system" and messages[-1]["role"] == role:
                raise input_error(ctx.file, i, where, f"two '{role}' turns in a row")
            messages.append({"role": role, "content": content})
    return messages


def split_conversation(turns: Any, i: int, field: str, ctx: Context) -> tuple[list[Message], str]:
    """(messages before the last assistant turn, that turn's text)."""
    messages = parse_messages(turns, i, field, ctx)
    last = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise input_error(ctx.file, i, field, "has no assistant turn to score")
    if not messages[last]["content"].strip():
        raise input_error(ctx.file, i, f"{field}[{last}]", "the assistant turn is empty")
    return messages[:last], messages[last]["content"]


def before_answer(messages: list[Message]) -> list[Message]:
    """A conversation without its final answer: a prompt column that holds the answer too never scores it."""
    return messages[:-1] if len(messages) > 1 and messages[-1]["role"] == "assistant" else messages


def history_turns(value: Any, i: int, ctx: Context) -> list[Message]:
    """LLaMA-Factory's alpaca ``history`` ([[instruction, response], ...]) as chat turns."""
    if not value:
        return []
    pairs = value if isinstance(value, list) else None
    if pairs is None or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)
                                for p in pairs):  # fmt: skip
        raise input_error(ctx.file, i, HISTORY_COLUMN, "must be a list of [instruction, response] pairs")
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def with_columns(turns: list[Message], row: dict, i: int, ctx: Context, context: bool = True) -> list[Message]:
    """``turns`` with the row's system column first (unless they open with a system turn) and its context column
    joined to the last user turn (``context``), as Alpaca joins instruction and input."""
    out = list(turns)
    col = ctx.column("context_column", CONTEXT_COLUMNS) if context else None
    users = [t for t, m in enumerate(out) if m["role"] == "user"]
    if col is not None and ctx.text(row, i, col, optional=True).strip() and users:
        at = users[-1]
        out[at] = {**out[at], "content": f"{out[at]['content']}\n{row[col]}"}
    col = ctx.column("system_column", SYSTEM_COLUMNS)
    if col is not None and ctx.text(row, i, col, optional=True).strip() and not (out and out[0]["role"] == "system"):
        out.insert(0, {"role": "system", "content": row[col]})
    return out


def row_prompt(row: dict, i: int, ctx: Context, names: tuple[str, ...] = PROMPT_COLUMNS) -> list[Message]:
    """The prompt from the row's columns: system, history, the instruction (a string, a dialogue transcript or a
    list of messages) and its context."""
    col = ctx.column("prompt_column", names)
    if col is None:
        raise GrapeError(f"{ctx.file}: no prompt column; expected one of {', '.join(names)}, or name it with "
                         "--prompt-column")  # fmt: skip
    value = row.get(col)
    if isinstance(value, list):
        turns = before_answer(parse_messages(value, i, col, ctx))
    else:
        text = ctx.text(row, i, col)
        turns = parse_dialogue(text) or [{"role": "user", "content": text}]
    if col != HISTORY_COLUMN and HISTORY_COLUMN in ctx.columns:
        turns = history_turns(row.get(HISTORY_COLUMN), i, ctx) + turns
    return with_columns(turns, row, i, ctx)


def prompt_reading(ctx: Context, names: tuple[str, ...] = PROMPT_COLUMNS) -> dict[str, Optional[str]]:
    """The columns ``row_prompt`` reads, by role."""
    prompt = ctx.column("prompt_column", names)
    history = HISTORY_COLUMN if prompt != HISTORY_COLUMN and HISTORY_COLUMN in ctx.columns else None
    return {"prompt": prompt, "history": history, "context": ctx.column("context_column", CONTEXT_COLUMNS),
            "system": ctx.column("system_column", SYSTEM_COLUMNS)}  # fmt: skip


class Format:
    """An input shape. Subclasses say whether they fit the columns, read rows, and write selections."""

    name: str = ""
    needs: str = ""  # what the shape needs, for the error when it is named (--format) but does not fit
    selected_reads_texts = True  # whether ``selected`` reads the picks' prompts and responses (or only their rows)
    options: frozenset[str] = frozenset({"source_column"})  # the column options (``COLUMN_OPTIONS``) it reads
    field_options: frozenset[str] = frozenset()  # those that may name a field of the candidates instead of a column

    def detect(self, ctx: Context) -> bool:
        raise NotImplementedError

    def read_row(self, row: dict, i: int, ctx: Context) -> Iterator[Draft | Reason]:
        """A ``Draft`` per candidate of row ``i``; a ``Reason`` for a candidate the row holds but the host would drop
        (counted under that reason)."""
        raise NotImplementedError

    def prepared(self, rows: Any, ctx: Context) -> Context:
        """The context for reading ``rows`` (a shape that needs to see every row first keeps what it read there)."""
        return ctx

    def check(self, ctx: Context, sample: Optional[dict]) -> None:
        """Refuse a column option this shape does not read, or one that names a missing column."""
        for option in named_options(ctx.cfg):
            named = getattr(ctx.cfg, option)
            if option not in self.options:
                takes = ", ".join(flag(o) for o in COLUMN_OPTIONS if o in self.options)
                raise GrapeError(f"{ctx.file}: {flag(option)} {named}: the data reads as {self.name} rows, which do "
                                 f"not use it (they take {takes})")  # fmt: skip
            if option not in self.field_options and named not in ctx.columns:
                raise missing_column(ctx, option)

    def reading(self, ctx: Context) -> dict[str, Optional[str]]:
        """The columns read (comma-separated), by role (for the summary)."""
        return {}

    def selected(self, dataset: Any, picks: Iterable[tuple[Group, Candidate]], ctx: Context) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape (default: the original rows). ``picks`` come
        in input order, read once (with their texts when ``selected_reads_texts``)."""
        return dataset.select(sorted({c.row for _, c in picks}))

    def source(self, row: dict, ctx: Context) -> Optional[str]:
        col = ctx.column("source_column", SOURCE_COLUMNS)
        return None if col is None or row.get(col) is None else str(row[col])


def missing_column(ctx: Context, option: str) -> GrapeError:
    return GrapeError(f"{ctx.file}: {flag(option)} {getattr(ctx.cfg, option)}: no such column; its columns are "
                      f"{', '.join(ctx.columns)}")  # fmt: skip


def conversation_rows(picks: Iterable[tuple[Group, Candidate]]) -> Any:
    """SFT rows in the messages shape: the whole prompt and the kept answer (with ``grape_source``)."""
    from datasets import Dataset

    rows = [{"messages": [*g.prompt, {"role": "assistant", "content": c.response}], ADDED_SOURCE: c.source}
            for g, c in picks]  # fmt: skip
    return Dataset.from_list(rows)


class LongRows(Format):
    """One row per (instruction, response): alpaca-like columns, rows grouped by id or prompt."""

    name = "long"
    selected_reads_texts = False
    needs = f"an instruction column ({'/'.join(PROMPT_COLUMNS)}) and a response column (--response-column)"
    options = PROMPT_OPTIONS | {"response_column", "source_column"}

    def detect(self, ctx: Context) -> bool:
        return bool(ctx.column("prompt_column", PROMPT_COLUMNS)) and bool(self.column(ctx))

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.column("response_column", RESPONSE_COLUMNS)

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        yield Draft(row_prompt(row, i, ctx), Candidate(ctx.text(row, i, col), self.source(row, ctx), i))

    def reading(self, ctx):
        source = ctx.column("source_column", SOURCE_COLUMNS)
        return {**prompt_reading(ctx), "response": self.column(ctx), "source": source}


class Messages(Format):
    """Chat rows (``messages`` in OpenAI roles, ShareGPT ``conversations``, Capybara's {input, output} turns): the
    last assistant turn is the candidate, every turn before it (and a system column) the prompt."""

    name = "messages"
    selected_reads_texts = False
    needs = "a messages/conversations column of chat turns"
    options = frozenset({"system_column", "source_column"})

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.first(MESSAGE_COLUMNS)

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        prompt, response = split_conversation(row.get(col), i, col, ctx)
        if not any(m["role"] == "user" for m in prompt):
            raise input_error(ctx.file, i, col, "the assistant turn to score has no user turn before it")
        yield Draft(with_columns(prompt, row, i, ctx, context=False), Candidate(response, self.source(row, ctx), i))

    def reading(self, ctx):
        return {"conversation": self.column(ctx), "system": ctx.column("system_column", SYSTEM_COLUMNS),
                "source": ctx.column("source_column", SOURCE_COLUMNS)}  # fmt: skip


class ListColumn(Format):
    """One row per instruction with a list of candidates: strings (sources in a parallel list such as ``models`` or
    ``generation_models``) or objects (UltraFeedback's ``completions``, Nectar's ``answers``) whose text and source
    are item fields. Each kept candidate becomes a row: the input row unchanged, plus ``grape_response`` and
    ``grape_source``."""

    name = "list"
    needs = f"a column holding a list of candidates ({'/'.join(LIST_COLUMNS)}), or name it with --candidates-column"
    options = PROMPT_OPTIONS | {"candidates_column", "source_column", "response_column"}
    field_options = frozenset({"source_column", "response_column"})

    def column(self, ctx: Context) -> Optional[str]:
        named = ctx.cfg.candidates_column
        if named in SOURCE_LISTS:
            found = ctx.first(LIST_COLUMNS)
            raise GrapeError(
                f"{ctx.file}: --candidates-column {named}: that column holds the candidates' sources, not their text"
                + (f"; the candidates are in '{found}'" if found else "")
            )
        return ctx.column("candidates_column", LIST_COLUMNS)

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

    def check(self, ctx, sample):
        super().check(ctx, sample)
        items = (sample or {}).get(self.column(ctx))
        if not isinstance(items, list):
            return
        objects = [item for item in items if isinstance(item, dict)]
        for option in ("response_column", "source_column"):
            named = getattr(ctx.cfg, option)
            if named is None or (option == "source_column" and named in ctx.columns):
                continue
            if not objects or not any(named in item for item in objects):
                what = f"objects with fields {fields(objects[0])}" if objects else "strings"
                raise GrapeError(f"{ctx.file}: {flag(option)} {named}: no such column, nor a field of the candidates "
                                 f"in '{self.column(ctx)}' (they are {what})")  # fmt: skip

    def item(self, item: Any, i: int, field: str, ctx: Context) -> tuple[str, Optional[str]]:
        """An item's text and, for an object, its source field."""
        if isinstance(item, str):
            if not item.strip():
                raise input_error(ctx.file, i, field, "is empty")
            return item, None
        if not isinstance(item, dict):
            raise input_error(ctx.file, i, field, f"is a {type(item).__name__}: expected a response string or an "
                                                  f"object with a {'/'.join(ITEM_TEXT_FIELDS)} field")  # fmt: skip
        text_field = ctx.cfg.response_column or next((f for f in ITEM_TEXT_FIELDS if f in item), None)
        if text_field is None or text_field not in item:
            raise input_error(ctx.file, i, field, f"an object with fields {', '.join(item)}: none holds the response "
                                                  "text; name the field with --response-column")  # fmt: skip
        text = item[text_field]
        if not isinstance(text, str) or not text.strip():
            raise input_error(ctx.file, i, f"{field}.{text_field}", "is empty" if text == "" or (
                isinstance(text, str)) else f"is a {type(text).__name__}, not a string")  # fmt: skip
        source_field = ctx.cfg.source_column or next((f for f in ITEM_SOURCE_FIELDS if f in item), None)
        return text, None if item.get(source_field) is None else str(item[source_field])

    def source_list(self, ctx: Context) -> Optional[str]:
        """The column of the candidates' sources: the one named with --source-column, else a parallel list."""
        named = ctx.cfg.source_column
        if named is None:
            return ctx.first(SOURCE_LISTS)
        return named if named in ctx.columns else None

    def sources(self, row: dict, i: int, n: int, ctx: Context) -> list[Optional[str]]:
        """Each candidate's source from the source column: a list (one name per candidate) or one name for all."""
        col = self.source_list(ctx)
        value = None if col is None else row.get(col)
        if isinstance(value, list):
            if len(value) != n and ctx.cfg.source_column is not None:
                raise input_error(ctx.file, i, col, f"has {len(value)} sources for {n} candidates")
            return [None if j >= len(value) or value[j] is None else str(value[j]) for j in range(n)]
        return [None if value is None else str(value)] * n

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        items = row.get(col)
        if not isinstance(items, list):
            kind = "missing" if items is None else f"a {type(items).__name__}"
            raise input_error(ctx.file, i, col, f"is {kind}, not a list of candidate responses "
                                                "(--candidates-column names the column that holds them)")  # fmt: skip
        prompt = row_prompt(row, i, ctx)
        named = ctx.cfg.source_column is not None and ctx.cfg.source_column in ctx.columns
        for j, (item, listed) in enumerate(zip(items, self.sources(row, i, len(items), ctx))):
            text, own = self.item(item, i, f"{col}[{j}]", ctx)
            source = listed if named else own if own is not None else listed
            yield Draft(prompt, Candidate(text, source if source is not None else f"{col}[{j}]", i, item=j))

    def reading(self, ctx):
        named = ctx.cfg.source_column
        role = "source" if named in ctx.columns else f"source (after the candidates' {named or 'model'} field)"
        return {**prompt_reading(ctx), "candidates": self.column(ctx), role: self.source_list(ctx)}

    def selected(self, dataset, picks, ctx):
        rows, responses, sources = [], [], []
        for _, c in picks:
            rows.append(c.row)
            responses.append(c.response)
            sources.append(c.source)
        kept = dataset.select(rows)  # the rows stay in Arrow; only the kept responses are Python strings
        kept = kept.remove_columns([c for c in (ADDED_RESPONSE, ADDED_SOURCE) if c in kept.column_names])
        return kept.add_column(ADDED_RESPONSE, responses).add_column(ADDED_SOURCE, sources)


def shared_dialogue(texts: Sequence[str]) -> Optional[tuple[list[Message], list[str]]]:
    """Dialogue transcripts that differ only in their last answer (HH-RLHF): (prompt turns, the answers). The prompt
    is the common text up to its last "Assistant:" mark."""
    first = texts[0]
    common = min(map(len, texts))
    for other in texts[1:]:
        common = next((n for n, (a, b) in enumerate(zip(first[:common], other)) if a != b), common)
    cut = first.rfind(ASSISTANT_MARK, 0, common + len(ASSISTANT_MARK))
    prompt = parse_dialogue(first[:cut] + ASSISTANT_MARK) if cut >= 0 else None
    if not prompt:
        return None
    rest = cut + len(ASSISTANT_MARK)
    return prompt, [t[rest:].strip() for t in texts]


class Slots(Format):
    """One column per candidate (chosen/rejected, response_0..N, human_ref_A/B, conversation_a/b): each holds an
    answer string, an answer message, or a whole conversation whose last assistant turn is the answer. A slot's own
    conversation before its answer is the prompt; otherwise the row's prompt columns are. The source is the slot's
    source column (``response_0_source``, ``model_a``, ``chosen-model``), else the slot's name. Kept candidates are
    written as SFT rows in the messages shape (with ``grape_source``)."""

    options = PROMPT_OPTIONS | {"source_column"}
    prompt_names = PROMPT_COLUMNS + MESSAGE_COLUMNS  # a conversation column ending in a user turn is a prompt
    every_slot = True  # whether a row must fill every slot (a missing one is an error, else it is not a candidate)

    def slots(self, ctx: Context) -> list[str]:
        """The candidates' columns, in order."""
        return ctx.cached((self.name, "slots"), lambda: self.find_slots(ctx))

    def find_slots(self, ctx: Context) -> list[str]:
        raise NotImplementedError

    def detect(self, ctx: Context) -> bool:
        return len(self.slots(ctx)) >= 2

    def tag(self, col: str) -> str:
        """What tells a slot from the others: ``a`` in ``model_a``, ``0`` in ``response_0``."""
        match = SLOT.match(col)
        return match[2] if match else col

    def source_columns(self, ctx: Context) -> list[Optional[str]]:
        """Each slot's source column (see ``find_source_columns``)."""
        return ctx.cached((self.name, "sources"), lambda: self.find_source_columns(ctx))

    def find_source_columns(self, ctx: Context) -> list[Optional[str]]:
        """Each slot's source column: found by name, or mapped from the one named with --source-column (naming the
        first slot's, e.g. ``model_a``, names ``model_b`` too); a plain column names every slot's source."""
        slots, named = self.slots(ctx), ctx.cfg.source_column
        if named is None:
            return [next((c for p in SLOT_SOURCES if (c := p.format(col=s, tag=self.tag(s))) in ctx.columns), None)
                    for s in slots]  # fmt: skip
        first, tag = slots[0], self.tag(slots[0])
        for old, pattern in ((first, re.escape(first)), (tag, rf"(?<=[_-]){re.escape(tag)}$")):
            if re.search(pattern, named):
                mapped = [re.sub(pattern, s if old == first else self.tag(s), named) for s in slots]
                if all(m in ctx.columns for m in mapped):
                    return mapped
        return [named] * len(slots)

    def answer(self, value: Any, i: int, field: str, ctx: Context) -> tuple[Optional[list[Message]], str]:
        """(the conversation before the answer, when the slot holds one; the answer)."""
        if isinstance(value, str):
            if not value.strip():
                raise input_error(ctx.file, i, field, "is empty")
            return None, value
        if isinstance(value, (dict, list)):
            return split_conversation([value] if isinstance(value, dict) else value, i, field, ctx)
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise input_error(ctx.file, i, field, f"is {kind}: expected a string, a message or a list of messages")

    def prompt(self, history: Optional[list[Message]], row: dict, i: int, ctx: Context) -> list[Message]:
        """A slot's prompt: its own conversation when that has a user turn, else the prompt columns (and the
        slot's turns after them)."""
        if history and any(m["role"] == "user" for m in history):
            if ctx.cfg.prompt_column is not None:
                raise GrapeError(f"{ctx.file}: --prompt-column {ctx.cfg.prompt_column}: the candidates carry their "
                                 "own conversation, which is the prompt; leave the option out")  # fmt: skip
            return with_columns(history, row, i, ctx)
        return row_prompt(row, i, ctx, self.prompt_names) + (history or [])

    def read_row(self, row, i, ctx):
        slots = [s for s in self.slots(ctx) if self.every_slot or row.get(s) is not None]
        if not slots:
            raise input_error(ctx.file, i, None, f"no candidate in {', '.join(self.slots(ctx))}")
        answers = [self.answer(row.get(s), i, s, ctx) for s in slots]
        has_prompt = ctx.column("prompt_column", self.prompt_names) is not None
        dialogue = None
        if not has_prompt and all(h is None for h, _ in answers):
            dialogue = shared_dialogue([a for _, a in answers])
            if dialogue is None:
                raise GrapeError(
                    f"{ctx.file}: no prompt column; expected {', '.join(self.prompt_names)} (or name it with "
                    f"--prompt-column), {', '.join(self.slots(ctx))} as message lists, or dialogue transcripts "
                    "(Human:/Assistant:) that share their prompt"
                )
        source_cols = dict(zip(self.slots(ctx), self.source_columns(ctx)))
        for item, (slot, (history, text)) in enumerate(zip(slots, answers)):
            if dialogue is not None:
                prompt, text = with_columns(dialogue[0], row, i, ctx), dialogue[1][item]
            else:
                prompt = self.prompt(history, row, i, ctx)
            if not text.strip():
                raise input_error(ctx.file, i, slot, "the answer after the shared prompt is empty")
            col = source_cols[slot]
            source = slot if col is None or row.get(col) is None else str(row[col])
            yield Draft(prompt, Candidate(text, source, i, item=self.slots(ctx).index(slot)))

    def reading(self, ctx):
        sources = [c for c in self.source_columns(ctx) if c is not None]
        read = {"prompt (unless the candidates hold the conversation)" if role == "prompt" else role: col
                for role, col in prompt_reading(ctx, self.prompt_names).items()}  # fmt: skip
        return {**read, "candidates": ", ".join(self.slots(ctx)), "source": ", ".join(dict.fromkeys(sources)) or None}

    def selected(self, dataset, picks, ctx):
        return conversation_rows(picks)


class Preference(Slots):
    """chosen/rejected rows (TRL, LLaMA-Factory, HH-RLHF and UltraFeedback shapes): both answers are candidates."""

    name = "preference"
    needs = "chosen and rejected columns"

    def find_slots(self, ctx: Context) -> list[str]:
        return list(PAIR) if all(c in ctx.columns for c in PAIR) else []


class Wide(Slots):
    """Numbered or lettered answer columns: ``response_0``/``response_1`` (PKU-SafeRLHF), ``human_ref_A``/``_B``
    (SHP, whose post is ``history``), ``conversation_a``/``_b`` with ``model_a``/``_b`` (Chatbot Arena). The stem
    with the most columns is read; a row may leave some empty."""

    name = "wide"
    needs = "two or more answer columns such as response_0, response_1 or human_ref_A, human_ref_B"
    every_slot = False

    def find_slots(self, ctx: Context) -> list[str]:
        stems: dict[str, list[str]] = {}
        for col in ctx.columns:
            if (match := SLOT.match(col)) is not None:
                stems.setdefault(match[1], []).append(col)
        cols = max(stems.values(), key=len, default=[])
        return sorted(cols, key=lambda c: (len(self.tag(c)), self.tag(c))) if len(cols) >= 2 else []


class Tree(Format):
    """OpenAssistant message trees (oasst1, oasst2): one row per message, linked by ``parent_id``. Sibling
    assistant replies are the candidates for their parent message; the thread above them is the prompt. Kept
    replies are written as SFT rows in the messages shape (with ``grape_source``)."""

    name = "tree"
    needs = f"{', '.join(TREE_COLUMNS)} columns (a message tree)"

    def detect(self, ctx: Context) -> bool:
        return all(c in ctx.columns for c in TREE_COLUMNS)

    def prepared(self, rows, ctx):
        """Every message by id: (parent id, role, text)."""
        if hasattr(rows, "select_columns"):
            rows = rows.select_columns(list(TREE_COLUMNS))
        index = {row["message_id"]: (row["parent_id"], row["role"], row["text"]) for row in all_rows(rows)}
        return replace(ctx, state=index)

    def read_row(self, row, i, ctx):
        role = row.get("role")
        if role == "prompter":
            return  # a prompt: the candidates are its replies
        if role != "assistant":
            raise input_error(ctx.file, i, "role", f"is {role!r}: expected prompter or assistant")
        text = ctx.text(row, i, "text")
        thread: list[Message] = []
        parent, seen = row.get("parent_id"), set()
        while parent is not None:
            if parent in seen or parent not in ctx.state:
                raise input_error(ctx.file, i, "parent_id", f"message {parent!r} of this thread is "
                                  + ("its own ancestor" if parent in seen else "not in the file"))  # fmt: skip
            seen.add(parent)
            parent, name, said = ctx.state[parent]
            thread.append({"role": ROLE_ALIASES.get(name, str(name)), "content": said})
        thread.reverse()
        if [m["role"] for m in thread] != ["user", "assistant"] * (len(thread) // 2) + ["user"]:
            raise input_error(ctx.file, i, "parent_id", "the thread above this reply must alternate prompter and "
                                                        "assistant messages, from a prompter one to its parent")
        yield Draft(thread, Candidate(text, self.source(row, ctx), i))

    def reading(self, ctx):
        return {"tree": ", ".join(TREE_COLUMNS), "source": ctx.column("source_column", SOURCE_COLUMNS)}

    def selected(self, dataset, picks, ctx):
        return conversation_rows(picks)


@hookimpl
def grape_register_formats(register: Callable[[str, Format], None]) -> None:
    # ties (as many candidates per row) go to the earlier shape
    for fmt in (Preference(), Wide(), ListColumn(), Messages(), LongRows(), Tree()):
        register(fmt.name, fmt)


def describe(value: Any) -> str:
    """What a value is, in a few words: "a string", "a list of {input, output} objects"."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return f"an object with fields {fields(value)}"
    if isinstance(value, list):
        kinds = {f"{fields(v)} objects" if isinstance(v, dict) else f"{type(v).__name__} items" for v in value[:5]}
        return "an empty list" if not kinds else f"a list of {kinds.pop() if len(kinds) == 1 else 'mixed items'}"
    return "empty" if value is None else f"a {type(value).__name__}"


def shape_hint(sample: dict, one_row: bool) -> str:
    """How the column options could read a row like ``sample`` (``one_row``: the data's only row)."""
    strings = [c for c, v in sample.items() if isinstance(v, str)]
    lists = [c for c, v in sample.items() if isinstance(v, list) and v]
    records = [c for c in lists if all(isinstance(v, dict) for v in sample[c])]
    if one_row and len(records) > 1:
        return (f"if the file is one object holding lists of records ({', '.join(records)}), keep one list per file: "
                "records are read from a top-level key when it is the object's only list")  # fmt: skip
    prompt = f"--prompt-column {strings[0]} " if strings else ""
    if lists:
        return f"to read it, name the columns: {prompt}--candidates-column {lists[0]} (a list of candidates)"
    if len(strings) >= 2:
        return f"to read it, name the columns: {prompt}--response-column {strings[1]} (one row per response)"
    return "name the columns with --prompt-column, --response-column or --candidates-column"


def unknown_shape(ctx: Context, sample: Optional[dict], one_row: bool = False) -> GrapeError:
    """The error for columns no shape reads: what the first row holds and which options could read it."""
    seen = "" if not sample else "; its first row has " + ", ".join(f"{c} ({describe(v)})" for c, v in sample.items())
    return GrapeError(
        f"{ctx.file}: cannot tell the data's shape from its columns ({', '.join(ctx.columns)}){seen}; expected an "
        f"instruction column ({'/'.join(PROMPT_COLUMNS)}) with a response column ({'/'.join(RESPONSE_COLUMNS)}), "
        "messages/conversations, a list of candidates, chosen/rejected, answer columns (response_0, response_1, "
        "...) or a message tree; " + (shape_hint(sample, one_row) if sample else "or name them with the column options")
    )


def candidates_in(fmt: Format, row: dict, ctx: Context) -> int:
    """How many candidates ``fmt`` reads from ``row`` (0 when it cannot read it)."""
    try:
        return sum(1 for _ in fmt.read_row(row, 0, fmt.prepared([row], ctx)))
    except GrapeError:
        return 0


def detect_format(ctx: Context, formats: dict[str, Format], rows: Any = None) -> Format:
    """The format the user named (which must fit the columns), else, of the registered ones that fit and read every
    column option set, the one reading the most candidates from the first of ``rows`` (when given). The column
    options are then checked against it."""
    sample = fetch_rows(rows, [0])[0] if rows is not None and len(rows) else None
    if ctx.cfg.format != "auto":
        fmt = formats.get(ctx.cfg.format)
        if fmt is None:
            raise GrapeError(f"--format {ctx.cfg.format} is not registered; known: {', '.join(formats)}")
        if not fmt.detect(ctx):
            raise GrapeError(f"{ctx.file}: --format {fmt.name} needs {fmt.needs}; the columns are "
                             f"{', '.join(ctx.columns)}")  # fmt: skip
        fmt.check(ctx, sample)
        return fmt
    fits = [fmt for fmt in formats.values() if fmt.detect(ctx)]
    missing = [o for o in named_options(ctx.cfg) if getattr(ctx.cfg, o) not in ctx.columns]
    if not fits:
        raise missing_column(ctx, missing[0]) if missing else unknown_shape(ctx, sample, sample and len(rows) == 1)
    named = set(named_options(ctx.cfg))
    usable = [fmt for fmt in fits if named <= fmt.options] or fits[:1]  # else the first one says what it refuses
    fmt = usable[0]
    if sample is not None and len(usable) > 1:
        fmt = max(usable, key=lambda f: candidates_in(f, sample, ctx))
    fmt.check(ctx, sample)
    return fmt


def reading(fmt: Format, ctx: Context) -> str:
    """What was read from which columns, in a line: "data.jsonl: list rows; prompt: instruction, candidates:
    responses; not read: chosen, rejected" (the columns other shapes would read candidates from)."""
    read = {role: col for role, col in fmt.reading(ctx).items() if col}
    used = {c for col in read.values() for c in col.split(", ")}
    answers = {*RESPONSE_COLUMNS, *LIST_COLUMNS, *MESSAGE_COLUMNS, *PAIR}
    unread = [c for c in ctx.columns if c not in used and (c in answers or SLOT.match(c))]
    return (f"{ctx.file}: {fmt.name} rows; " + ", ".join(f"{role}: {col}" for role, col in read.items())
            + (f"; not read: {', '.join(unread)}" if unread else ""))


class Input(NamedTuple):
    """One input part: its rows, its format, its reading context, and how many of its instructions to read."""

    rows: Sequence[dict]  # read in order, then by index (a ``datasets.Dataset`` or a list)
    format: Format
    context: Context
    limit: Optional[int] = None  # read the first N instructions of this part and keep N rows (a host's max_samples)


class Read(NamedTuple):
    """One draft as read, without its texts: its part, row, id (when the group_by column has one), the hash of its
    prompt and its candidate as an outline."""

    part: int
    row: int
    id: Optional[str]
    prompt_hash: str
    candidate: CandidateOutline


def id_column(ctx: Context) -> Optional[str]:
    """The column ``group_by`` groups on: ``id`` (for ``auto``, when present), a named column, or none."""
    by = ctx.cfg.group_by
    if by == "prompt":
        return None
    return ctx.first(("id",)) if by == "auto" else ctx.first((), by, "--group-by")


def outline(draft: Draft, part: int) -> tuple[str, CandidateOutline]:
    """A draft's prompt hash and its candidate without the text (its digest and size instead)."""
    prompt_chars = sum(len(m["content"]) for m in draft.prompt)
    cand = draft.candidate
    source = None if cand.source is None else sys.intern(cand.source)  # one string per source, not per row
    chars = prompt_chars + len(cand.response)
    return prompt_key(draft.prompt, draft.context), CandidateOutline(source, cand.row, cand.index, part, cand.item,
                                                                     text_digest(cand.response), chars)  # fmt: skip


def read_drafts(inputs: Sequence[Input]) -> tuple[list[Read], Drops, list[str]]:
    """Every draft of every input, as outlines; the candidates a format dropped and the skipped rows
    (``on_bad_row: skip``), counted by reason, with the first few rows named. A bad row otherwise stops the run with a
    message that names the option."""
    reads: list[Read] = []
    skipped, dropped = Counter(), Counter()
    examples: list[str] = []
    for part, (rows, fmt, ctx, _) in enumerate(inputs):
        ctx = fmt.prepared(rows, ctx)
        id_col = id_column(ctx)
        for i, row in enumerate(all_rows(rows)):
            try:
                drafts = list(fmt.read_row(row, i, ctx))
            except RowError as exc:
                if ctx.cfg.on_bad_row == "error":
                    raise GrapeError(f"{exc}; {SKIP_HINT}") from None
                skipped[exc.reason] += 1
                examples += [str(exc)][: SKIP_EXAMPLES - len(examples)]
                continue
            row_id = None if id_col is None or row.get(id_col) is None else str(row[id_col])
            reads += [Read(part, i, row_id, *outline(d, part)) for d in drafts if isinstance(d, Draft)]
            dropped.update(d for d in drafts if isinstance(d, Reason))
    return reads, Drops.of(dropped, rows=skipped), examples


def batch_rows(batch: dict[str, list]) -> list[dict]:
    """A columnar batch (``datasets``: column -> values) as one dict per row."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def all_rows(rows: Any) -> Iterator[dict]:
    """Every row in order: read a batch at a time from a ``datasets.Dataset`` (much faster than row by row)."""
    if not hasattr(rows, "column_names"):
        yield from rows
        return
    for batch in rows.iter(batch_size=1024):
        yield from batch_rows(batch)


def fetch_rows(rows: Any, indices: list[int]) -> list[dict]:
    """The rows at ``indices``: one columnar read from a ``datasets.Dataset``, else one by one."""
    return batch_rows(rows[indices]) if hasattr(rows, "column_names") else [rows[i] for i in indices]


def loader(inputs: Sequence[Input]) -> Loader:
    """``Grouped.load`` for groups read from ``inputs``: the candidates' rows are read again (each once per call)."""

    contexts: dict[int, Context] = {}  # each part's, prepared on first use

    def load(groups: Sequence[GroupOutline]) -> tuple[Group, ...]:
        wanted = sorted({(c.part, c.row) for g in groups for c in g.candidates})
        drafts: dict[tuple[int, int, Optional[int]], Draft] = {}
        for part in sorted({p for p, _ in wanted}):
            rows, fmt, ctx, _ = inputs[part]
            if part not in contexts:
                contexts[part] = fmt.prepared(rows, ctx)
            ctx = contexts[part]
            indices = [r for p, r in wanted if p == part]
            for i, row in zip(indices, fetch_rows(rows, indices)):
                read = [d for d in fmt.read_row(row, i, ctx) if isinstance(d, Draft)]
                drafts.update(((part, i, d.candidate.item), d) for d in read)
        out = []
        for g in groups:
            found = [drafts[(c.part, c.row, c.item)] for c in g.candidates]
            out.append(g.with_texts(found[0].prompt, found[0].context, (d.candidate.response for d in found)))
        return tuple(out)

    return load


def group_rows(inputs: Sequence[Input], min_candidates: int, limit: Optional[int] = None) -> Grouped:
    """Turn the rows of every input into groups (outlines, see ``Grouped``), across parts (see the module's
    docstring); ``limit`` keeps the first N instructions. ``Input.rows`` must allow reading a row by its index."""
    from .datafiles import release_memory

    reads, dropped, examples = read_drafts(inputs)
    ids_per_row = Counter({(r.part, r.row): r.id for r in reads if r.id is not None}.values())
    by_id = any(n > 1 for n in ids_per_row.values()) or any(i.context.cfg.group_by not in ("auto", "prompt")
                                                            for i in inputs)  # fmt: skip
    drafts: dict[str, tuple[GroupOutline, list[CandidateOutline]]] = {}
    seen: list[set[str]] = [set() for _ in inputs]
    for part, i, row_id, prompt_hash, cand in reads:
        key = row_id if by_id and row_id is not None else prompt_hash
        part_limit = inputs[part].limit
        if part_limit is not None and key not in seen[part] and len(seen[part]) >= part_limit:
            continue
        seen[part].add(key)
        if key not in drafts:
            drafts[key] = (GroupOutline(key, row=i, prompt_hash=prompt_hash), [])
        elif key == row_id and drafts[key][0].prompt_hash != prompt_hash:
            ctx = inputs[part].context
            first = drafts[key][0].row + 1
            raise input_error(ctx.file, i, id_column(ctx), f"id {key!r} was first seen at row {first} with a "
                                                           "different prompt; group by prompt with --group-by prompt")
        drafts[key][1].append(cand)
    grouped = finish_groups([g.with_candidates(c) for g, c in list(drafts.values())[:limit]], min_candidates)
    del reads  # before giving its memory back
    release_memory()  # the rows' texts, read to group them
    return replace(grouped, drops=grouped.drops + dropped, skipped=tuple(examples), load=loader(inputs),
                   reading=tuple(reading(i.format, i.context) for i in inputs))


def finish_groups(groups: Iterable[GroupOutline], min_candidates: int) -> Grouped:
    """Deduplicate identical responses within each group, number candidates, enforce ``min_candidates``."""
    kept, candidates, instructions = [], Counter(), Counter()
    for group in groups:
        unique: dict[bytes, CandidateOutline] = {}
        for cand in group.candidates:
            if cand.digest in unique:
                candidates[Reason.DUPLICATE_RESPONSE] += 1
            else:
                unique[cand.digest] = replace(cand, index=len(unique))
        if not unique:
            instructions[Reason.NO_VALID_CANDIDATE] += 1
        elif len(unique) < min_candidates:
            instructions[Reason.TOO_FEW_CANDIDATES] += 1
            candidates[Reason.TOO_FEW_CANDIDATES] += len(unique)
        else:
            kept.append(group.with_candidates(unique.values()))
    return Grouped(tuple(kept), Drops.of(candidates, instructions))
