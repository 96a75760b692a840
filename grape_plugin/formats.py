"""Input shapes: read rows into groups of candidates, and write a selection back in the input's shape.

Every shape turns a row into (prompt messages, candidates). Rows are then grouped by an id column when
there is one, else by the exact prompt, so pooled data (one row per instruction and generator) and data
with a list of candidates per row end up the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from .config import GrapeConfig
from .errors import GrapeError, input_error
from .hookspecs import hookimpl
from .records import Candidate, Draft, Drops, Group, Grouped, Message, prompt_key

PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")
RESPONSE_COLUMNS = ("output", "response", "completion", "answer")
SOURCE_COLUMNS = ("generator", "source", "model")
LIST_COLUMNS = ("responses", "candidates", "outputs", "completions")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Context:
    """What a format needs to turn one row into candidates."""

    file: str
    columns: list[str]
    cfg: GrapeConfig

    def first(self, names: tuple[str, ...], override: Optional[str] = None) -> Optional[str]:
        """The column the user named, else the first of ``names`` present in the data."""
        if override is not None:
            if override not in self.columns:
                raise GrapeError(f"{self.file}: column '{override}' not found; columns are {', '.join(self.columns)}")
            return override
        return next((c for c in names if c in self.columns), None)

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


class Format:
    """An input shape. Subclasses say whether they fit the columns, read rows, and write selections."""

    name: str = ""

    def detect(self, ctx: Context) -> bool:
        raise NotImplementedError

    def read_row(self, row: dict, i: int, ctx: Context) -> Iterator[Draft]:
        raise NotImplementedError

    def selected(self, dataset: Any, picks: list[tuple[Group, Candidate]], ctx: Context) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape (default: the original rows)."""
        return dataset.select(sorted({c.row for _, c in picks}))

    def source(self, row: dict, ctx: Context) -> Optional[str]:
        col = ctx.first(SOURCE_COLUMNS, ctx.cfg.source_column)
        return None if col is None or row.get(col) is None else str(row[col])


def alpaca_prompt(row: dict, i: int, ctx: Context) -> list[Message]:
    """system + instruction (+ "\\n" + input) as chat messages."""
    col = ctx.first(PROMPT_COLUMNS)
    if col is None:
        raise GrapeError(f"{ctx.file}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}")
    user = ctx.text(row, i, col)
    if "input" in ctx.columns and ctx.text(row, i, "input", optional=True).strip():
        user = f"{user}\n{row['input']}"
    prompt = [{"role": "user", "content": user}]
    if "system" in ctx.columns and ctx.text(row, i, "system", optional=True).strip():
        prompt.insert(0, {"role": "system", "content": row["system"]})
    return prompt


def parse_messages(turns: Any, i: int, field: str, ctx: Context) -> list[Message]:
    """OpenAI (role/content) or ShareGPT (from/value) turns as validated chat messages."""
    if not isinstance(turns, list) or not turns:
        raise input_error(ctx.file, i, field, "must be a non-empty list of messages")
    messages: list[Message] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise input_error(ctx.file, i, f"{field}[{t}]", "must be a message object")
        name = turn.get("role", turn.get("from"))
        role = ROLE_ALIASES.get(name)
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise input_error(ctx.file, i, f"{field}[{t}]", f"unknown role {name!r}")
        if not isinstance(content, str):
            raise input_error(ctx.file, i, f"{field}[{t}]", "content must be a string")
        if role == "system" and t != 0:
            raise input_error(ctx.file, i, f"{field}[{t}]", "a system message may only come first")
        if messages and role != "system" and messages[-1]["role"] == role:
            raise input_error(ctx.file, i, f"{field}[{t}]", f"two '{role}' turns in a row")
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


class LongRows(Format):
    """One row per (instruction, response): alpaca-like columns, rows grouped by id or prompt."""

    name = "long"

    def detect(self, ctx: Context) -> bool:
        return bool(ctx.first(PROMPT_COLUMNS)) and bool(ctx.first(RESPONSE_COLUMNS, ctx.cfg.response_column))

    def read_row(self, row, i, ctx):
        response_col = ctx.first(RESPONSE_COLUMNS, ctx.cfg.response_column)
        if response_col is None:
            raise GrapeError(f"{ctx.file}: no response column; expected one of {', '.join(RESPONSE_COLUMNS)}")
        yield Draft(alpaca_prompt(row, i, ctx), Candidate(ctx.text(row, i, response_col), self.source(row, ctx), i))


class Messages(Format):
    """Chat rows (``messages`` in OpenAI roles, or ShareGPT ``conversations``): the last assistant turn is the candidate."""

    name = "messages"

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.first(("messages", "conversations", "conversation"))

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

    def read_row(self, row, i, ctx):
        prompt, response = split_conversation(row.get(self.column(ctx)), i, self.column(ctx), ctx)
        if not any(m["role"] == "user" for m in prompt):
            raise input_error(ctx.file, i, self.column(ctx), "the assistant turn to score has no user turn before it")
        yield Draft(prompt, Candidate(response, self.source(row, ctx), i))


class ListColumn(Format):
    """One row per instruction with a list of candidate responses; kept ones become one row each."""

    name = "list"

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.first(LIST_COLUMNS, ctx.cfg.candidates_column)

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        responses = row.get(col)
        if not isinstance(responses, list):
            raise input_error(ctx.file, i, col, "must be a list of responses")
        sources = row.get(f"{col}_sources") or row.get("generators") or row.get("sources")
        prompt = alpaca_prompt(row, i, ctx)
        for j, response in enumerate(responses):
            if not isinstance(response, str) or not response.strip():
                raise input_error(ctx.file, i, f"{col}[{j}]", "must be a non-empty string")
            source = str(sources[j]) if isinstance(sources, list) and j < len(sources) else f"{col}[{j}]"
            yield Draft(prompt, Candidate(response, source, i, item=j))

    def selected(self, dataset, picks, ctx):
        from datasets import Dataset

        col = self.column(ctx)
        rows = []
        for _, cand in sorted(picks, key=lambda p: p[1].origin):
            row = {k: v for k, v in dataset[cand.row].items() if k != col}
            row.update(output=cand.response, source=cand.source)
            rows.append(row)
        return Dataset.from_list(rows)


class Preference(Format):
    """chosen/rejected rows (TRL and LLaMA-Factory shapes): both answers are candidates, written as SFT messages."""

    name = "preference"

    def detect(self, ctx: Context) -> bool:
        return "chosen" in ctx.columns and "rejected" in ctx.columns

    def answer(self, value: Any, i: int, field: str, ctx: Context) -> tuple[Optional[list[Message]], str]:
        if isinstance(value, str):
            if not value.strip():
                raise input_error(ctx.file, i, field, "is empty")
            return None, value
        if isinstance(value, dict):
            return split_conversation([value], i, field, ctx)
        if isinstance(value, list):
            return split_conversation(value, i, field, ctx)
        raise input_error(ctx.file, i, field, "must be a string, a message or a list of messages")

    def read_row(self, row, i, ctx):
        answers = {slot: self.answer(row.get(slot), i, slot, ctx) for slot in ("chosen", "rejected")}
        prompt_col = ctx.first(("prompt", "messages", "conversations"))
        if prompt_col is not None and isinstance(row.get(prompt_col), list):
            prompt = parse_messages(row[prompt_col], i, prompt_col, ctx)
        elif prompt_col is not None or ctx.first(PROMPT_COLUMNS):
            prompt = alpaca_prompt(row, i, ctx)
        elif answers["chosen"][0] is not None:
            prompt = answers["chosen"][0]  # TRL's implicit prompt: the conversation before the answer
        else:
            raise GrapeError(f"{ctx.file}: no prompt column; expected prompt, messages, conversations or instruction")
        for item, (slot, (_, text)) in enumerate(answers.items()):
            yield Draft(prompt, Candidate(text, slot, i, item=item))

    def selected(self, dataset, picks, ctx):
        from datasets import Dataset

        rows = [
            {"messages": [*g.prompt, {"role": "assistant", "content": c.response}], "source": c.source}
            for g, c in sorted(picks, key=lambda p: p[1].origin)
        ]
        return Dataset.from_list(rows)


@hookimpl
def grape_register_formats(register: Callable[[str, Format], None]) -> None:
    # detection order: the most specific shape first
    for fmt in (Preference(), ListColumn(), Messages(), LongRows()):
        register(fmt.name, fmt)


def detect_format(ctx: Context, formats: dict[str, Format]) -> Format:
    """The format the user named, else the first registered one whose columns fit."""
    if ctx.cfg.format != "auto":
        if ctx.cfg.format not in formats:
            raise GrapeError(f"format '{ctx.cfg.format}' is not registered; known: {', '.join(formats)}")
        return formats[ctx.cfg.format]
    for fmt in formats.values():
        if fmt.detect(ctx):
            return fmt
    raise GrapeError(
        f"{ctx.file}: cannot tell the data's shape from its columns ({', '.join(ctx.columns)}); expected "
        f"an instruction column ({'/'.join(PROMPT_COLUMNS)}) with a response column ({'/'.join(RESPONSE_COLUMNS)}), "
        "messages/conversations, a list of candidates, or chosen/rejected; or name them with the column options"
    )


class Input(NamedTuple):
    """One input part: its rows, its format, its reading context, and how many of its instructions to read."""

    rows: Iterable[dict]
    format: Format
    context: Context
    limit: Optional[int] = None  # read only the first N instructions of this part (a host's max_samples)


def group_rows(inputs: Sequence[Input], min_candidates: int, limit: Optional[int] = None) -> Grouped:
    """Turn the rows of every input into groups (candidates numbered by part): by the id column when present, else
    by the exact prompt, across parts; ``limit`` keeps the first N instructions."""
    drafts: dict[str, tuple[Group, list[Candidate]]] = {}
    for part, (rows, fmt, ctx, part_limit) in enumerate(inputs):
        id_col = ctx.first(("id",), ctx.cfg.id_column)
        seen: set[str] = set()
        for i, row in enumerate(rows):
            for prompt, cand, context in fmt.read_row(row, i, ctx):
                has_id = id_col is not None and row.get(id_col) is not None
                key = str(row[id_col]) if has_id else prompt_key(prompt, context)
                if part_limit is not None and key not in seen and len(seen) >= part_limit:
                    continue
                seen.add(key)
                if key not in drafts:
                    drafts[key] = (Group(key, tuple(prompt), row=i, context=context), [])
                elif has_id and (drafts[key][0].prompt, drafts[key][0].context) != (tuple(prompt), context):
                    first = drafts[key][0].row + 1
                    raise input_error(ctx.file, i, id_col, f"id {key!r} was first seen at row {first} with a different prompt")
                drafts[key][1].append(replace(cand, part=part))
    return finish_groups([g.with_candidates(c) for g, c in list(drafts.values())[:limit]], min_candidates)


def finish_groups(groups: Iterable[Group], min_candidates: int) -> Grouped:
    """Deduplicate identical responses within each group, number candidates, enforce ``min_candidates``."""
    kept, candidates, instructions = [], Counter(), Counter()
    for group in groups:
        unique: dict[str, Candidate] = {}
        for cand in group.candidates:
            if cand.response in unique:
                candidates["duplicate_response"] += 1
            else:
                unique[cand.response] = replace(cand, index=len(unique))
        if not unique:
            instructions["no_valid_candidate"] += 1
        elif len(unique) < min_candidates:
            instructions["too_few_candidates"] += 1
            candidates["too_few_candidates"] += len(unique)
        else:
            kept.append(group.with_candidates(unique.values()))
    return Grouped(tuple(kept), Drops.of(candidates, instructions))
