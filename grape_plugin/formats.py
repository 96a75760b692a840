"""Input shapes: read rows into groups of candidates, and write a selection back in the input's shape.

Every shape turns a row into drafts (a prompt as chat messages and one candidate). Drafts are grouped into
instructions by ``group_by``: by default an ``id`` column groups only when its ids repeat (many datasets give every
row its own id), otherwise the exact prompt does, so pooled data (one row per instruction and generator) and data
with a list of candidates per row end up the same way. Dialogue text ("Human: ... Assistant: ...", as in
HH-RLHF and Nectar) is read as chat turns.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from .config import GrapeConfig
from .errors import SKIP_HINT, GrapeError, RowError, input_error
from .hookspecs import hookimpl
from .records import Candidate, Draft, Drops, Group, Grouped, Loader, Message, Reason, prompt_key, text_digest

PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")
RESPONSE_COLUMNS = ("output", "response", "completion", "answer")
SOURCE_COLUMNS = ("generator", "source", "model")
LIST_COLUMNS = ("responses", "candidates", "outputs", "completions", "answers")
ITEM_TEXT_FIELDS = ("response", "answer", "text", "content", "output", "completion")  # in a list of objects
ITEM_SOURCE_FIELDS = ("model", "source", "generator")
SOURCE_LISTS = ("models", "generators", "sources")  # the sources of a list of strings, position by position
ADDED_RESPONSE, ADDED_SOURCE = "grape_response", "grape_source"  # columns a selection adds to a list's rows
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
DIALOGUE_TURN = re.compile(r"\n\n(Human|Assistant):")
ASSISTANT_MARK = "\n\nAssistant:"
SKIP_EXAMPLES = 5  # skipped rows named in the report


@dataclass
class Context:
    """What a format needs to turn one row into candidates."""

    file: str
    columns: list[str]
    cfg: GrapeConfig

    def first(self, names: tuple[str, ...], override: Optional[str] = None, option: str = "") -> Optional[str]:
        """The column the user named (with ``option``), else the first of ``names`` present in the data."""
        if override is not None:
            if override not in self.columns:
                raise GrapeError(f"{self.file}: {option + ' ' if option else ''}{override}: no such column; "
                                 f"its columns are {', '.join(self.columns)}")  # fmt: skip
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


class Format:
    """An input shape. Subclasses say whether they fit the columns, read rows, and write selections."""

    name: str = ""
    needs: str = ""  # what the shape needs, for the error when it is named (--format) but does not fit
    selected_reads_texts = True  # whether ``selected`` reads the picks' prompts and responses (or only their rows)

    def detect(self, ctx: Context) -> bool:
        raise NotImplementedError

    def read_row(self, row: dict, i: int, ctx: Context) -> Iterator[Draft]:
        raise NotImplementedError

    def selected(self, dataset: Any, picks: Iterable[tuple[Group, Candidate]], ctx: Context) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape (default: the original rows). ``picks`` come
        in input order, read once (with their texts when ``selected_reads_texts``)."""
        return dataset.select(sorted({c.row for _, c in picks}))

    def source(self, row: dict, ctx: Context) -> Optional[str]:
        col = ctx.first(SOURCE_COLUMNS, ctx.cfg.source_column, "--source-column")
        return None if col is None or row.get(col) is None else str(row[col])


def alpaca_prompt(row: dict, i: int, ctx: Context) -> list[Message]:
    """system + instruction (+ "\\n" + input) as chat messages; a dialogue transcript as its turns."""
    col = ctx.first(PROMPT_COLUMNS)
    if col is None:
        raise GrapeError(f"{ctx.file}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}")
    user = ctx.text(row, i, col)
    if "input" in ctx.columns and ctx.text(row, i, "input", optional=True).strip():
        user = f"{user}\n{row['input']}"
    prompt = parse_dialogue(user) or [{"role": "user", "content": user}]
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
    selected_reads_texts = False
    needs = f"an instruction column ({'/'.join(PROMPT_COLUMNS)}) and a response column (--response-column)"

    def detect(self, ctx: Context) -> bool:
        return bool(ctx.first(PROMPT_COLUMNS)) and bool(self.column(ctx))

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.first(RESPONSE_COLUMNS, ctx.cfg.response_column, "--response-column")

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        yield Draft(alpaca_prompt(row, i, ctx), Candidate(ctx.text(row, i, col), self.source(row, ctx), i))


class Messages(Format):
    """Chat rows (``messages`` in OpenAI roles, or ShareGPT ``conversations``): the last assistant turn is the candidate."""

    name = "messages"
    selected_reads_texts = False
    needs = "a messages/conversations column of chat turns"

    def column(self, ctx: Context) -> Optional[str]:
        return ctx.first(("messages", "conversations", "conversation"))

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        prompt, response = split_conversation(row.get(col), i, col, ctx)
        if not any(m["role"] == "user" for m in prompt):
            raise input_error(ctx.file, i, col, "the assistant turn to score has no user turn before it")
        yield Draft(prompt, Candidate(response, self.source(row, ctx), i))


class ListColumn(Format):
    """One row per instruction with a list of candidates: strings (sources in a parallel ``models`` list) or
    objects (UltraFeedback's ``completions``, Nectar's ``answers``) whose text and source are item fields. Each kept
    candidate becomes a row: the input row unchanged, plus ``grape_response`` and ``grape_source``."""

    name = "list"
    needs = f"a column holding a list of candidates ({'/'.join(LIST_COLUMNS)}), or name it with --candidates-column"

    def column(self, ctx: Context) -> Optional[str]:
        named = ctx.cfg.candidates_column
        if named in SOURCE_LISTS:
            found = ctx.first(LIST_COLUMNS)
            raise GrapeError(
                f"{ctx.file}: --candidates-column {named}: that column holds the candidates' sources, not their text"
                + (f"; the candidates are in '{found}'" if found else "")
            )
        return ctx.first(LIST_COLUMNS, named, "--candidates-column")

    def detect(self, ctx: Context) -> bool:
        return self.column(ctx) is not None

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

    def read_row(self, row, i, ctx):
        col = self.column(ctx)
        items = row.get(col)
        if not isinstance(items, list):
            kind = "missing" if items is None else f"a {type(items).__name__}"
            raise input_error(ctx.file, i, col, f"is {kind}, not a list of candidate responses "
                                                "(--candidates-column names the column that holds them)")  # fmt: skip
        sources = row.get(ctx.first(SOURCE_LISTS, None))
        prompt = alpaca_prompt(row, i, ctx)
        for j, item in enumerate(items):
            text, source = self.item(item, i, f"{col}[{j}]", ctx)
            if source is None:
                source = str(sources[j]) if isinstance(sources, list) and j < len(sources) else f"{col}[{j}]"
            yield Draft(prompt, Candidate(text, source, i, item=j))

    def selected(self, dataset, picks, ctx):
        rows, responses, sources = [], [], []
        for _, c in picks:
            rows.append(c.row)
            responses.append(c.response)
            sources.append(c.source)
        kept = dataset.select(rows)  # the rows stay in Arrow; only the kept responses are Python strings
        kept = kept.remove_columns([c for c in (ADDED_RESPONSE, ADDED_SOURCE) if c in kept.column_names])
        return kept.add_column(ADDED_RESPONSE, responses).add_column(ADDED_SOURCE, sources)


def shared_dialogue(chosen: str, rejected: str) -> Optional[tuple[list[Message], str, str]]:
    """Two dialogue transcripts that differ only in their last answer (HH-RLHF): (prompt turns, the two answers).
    The prompt is the common text up to its last "Assistant:" mark."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_MARK, 0, common + len(ASSISTANT_MARK))
    prompt = parse_dialogue(chosen[:cut] + ASSISTANT_MARK) if cut >= 0 else None
    if not prompt:
        return None
    rest = cut + len(ASSISTANT_MARK)
    return prompt, chosen[rest:].strip(), rejected[rest:].strip()


class Preference(Format):
    """chosen/rejected rows (TRL, LLaMA-Factory and HH-RLHF shapes): both answers are candidates, written as SFT
    messages (with ``grape_source``: chosen or rejected)."""

    name = "preference"
    needs = "chosen and rejected columns"

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
        (chosen_prompt, chosen), (_, rejected) = (self.answer(row.get(k), i, k, ctx) for k in ("chosen", "rejected"))
        prompt_col = ctx.first(("prompt", "messages", "conversations"))
        if prompt_col is not None and isinstance(row.get(prompt_col), list):
            prompt = parse_messages(row[prompt_col], i, prompt_col, ctx)
        elif prompt_col is not None or ctx.first(PROMPT_COLUMNS):
            prompt = alpaca_prompt(row, i, ctx)
        elif chosen_prompt is not None:
            prompt = chosen_prompt  # TRL's implicit prompt: the conversation before the answer
        elif (dialogue := shared_dialogue(chosen, rejected)) is not None:
            prompt, chosen, rejected = dialogue
        else:
            raise GrapeError(
                f"{ctx.file}: no prompt column; expected prompt, messages, conversations or instruction, chosen and "
                "rejected as message lists, or dialogue transcripts (Human:/Assistant:) that share their prompt"
            )
        for item, (slot, text) in enumerate((("chosen", chosen), ("rejected", rejected))):
            if not text.strip():
                raise input_error(ctx.file, i, slot, "the answer after the shared prompt is empty")
            yield Draft(prompt, Candidate(text, slot, i, item=item))

    def selected(self, dataset, picks, ctx):
        from datasets import Dataset

        rows = [{"messages": [*g.prompt, {"role": "assistant", "content": c.response}], ADDED_SOURCE: c.source}
                for g, c in picks]  # fmt: skip
        return Dataset.from_list(rows)


@hookimpl
def grape_register_formats(register: Callable[[str, Format], None]) -> None:
    # detection order: the most specific shape first
    for fmt in (Preference(), ListColumn(), Messages(), LongRows()):
        register(fmt.name, fmt)


def detect_format(ctx: Context, formats: dict[str, Format]) -> Format:
    """The format the user named (which must fit the columns), else the first registered one that fits."""
    if ctx.cfg.format != "auto":
        fmt = formats.get(ctx.cfg.format)
        if fmt is None:
            raise GrapeError(f"--format {ctx.cfg.format} is not registered; known: {', '.join(formats)}")
        if not fmt.detect(ctx):
            raise GrapeError(f"{ctx.file}: --format {fmt.name} needs {fmt.needs}; the columns are "
                             f"{', '.join(ctx.columns)}")  # fmt: skip
        return fmt
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

    rows: Sequence[dict]  # read in order, then by index (a ``datasets.Dataset`` or a list)
    format: Format
    context: Context
    limit: Optional[int] = None  # read only the first N instructions of this part (a host's max_samples)


class Read(NamedTuple):
    """One draft as read, without its texts: its part, row, id (when the group_by column has one), the hash of its
    prompt and its candidate as an outline."""

    part: int
    row: int
    id: Optional[str]
    prompt_hash: str
    candidate: Candidate


def id_column(ctx: Context) -> Optional[str]:
    """The column ``group_by`` groups on: ``id`` (for ``auto``, when present), a named column, or none."""
    by = ctx.cfg.group_by
    if by == "prompt":
        return None
    return ctx.first(("id",)) if by == "auto" else ctx.first((), by, "--group-by")


def outline(draft: Draft, part: int) -> tuple[str, Candidate]:
    """A draft's prompt hash and its candidate without the text (its digest and size instead)."""
    prompt_chars = sum(len(m["content"]) for m in draft.prompt)
    cand = draft.candidate
    source = None if cand.source is None else sys.intern(cand.source)  # one string per source, not per row
    chars = prompt_chars + len(cand.response)
    return prompt_key(draft.prompt, draft.context), Candidate("", source, cand.row, cand.index, part, cand.item,
                                                              text_digest(cand.response), chars)  # fmt: skip


def read_drafts(inputs: Sequence[Input]) -> tuple[list[Read], Counter, list[str]]:
    """Every draft of every input, as outlines, with the skipped rows counted by reason (``on_bad_row: skip``) and
    the first few named; a bad row otherwise stops the run with a message that names the option."""
    reads: list[Read] = []
    skipped: Counter = Counter()
    examples: list[str] = []
    for part, (rows, fmt, ctx, _) in enumerate(inputs):
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
            reads += [Read(part, i, row_id, *outline(d, part)) for d in drafts]
    return reads, skipped, examples


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

    def load(groups: Sequence[Group]) -> tuple[Group, ...]:
        wanted = sorted({(c.part, c.row) for g in groups for c in g.candidates})
        drafts: dict[tuple[int, int, Optional[int]], Draft] = {}
        for part in sorted({p for p, _ in wanted}):
            rows, fmt, ctx, _ = inputs[part]
            indices = [r for p, r in wanted if p == part]
            for i, row in zip(indices, fetch_rows(rows, indices)):
                drafts.update(((part, i, d.candidate.item), d) for d in fmt.read_row(row, i, ctx))
        out = []
        for g in groups:
            found = [drafts[(c.part, c.row, c.item)] for c in g.candidates]
            cands = (replace(c, response=d.candidate.response) for c, d in zip(g.candidates, found))
            out.append(replace(g, prompt=tuple(found[0].prompt), context=found[0].context, candidates=tuple(cands)))
        return tuple(out)

    return load


def group_rows(inputs: Sequence[Input], min_candidates: int, limit: Optional[int] = None) -> Grouped:
    """Turn the rows of every input into groups (outlines, see ``Grouped``), across parts (see the module's
    docstring); ``limit`` keeps the first N instructions. ``Input.rows`` must allow reading a row by its index."""
    from .datafiles import release_memory

    reads, skipped, examples = read_drafts(inputs)
    ids_per_row = Counter({(r.part, r.row): r.id for r in reads if r.id is not None}.values())
    by_id = any(n > 1 for n in ids_per_row.values()) or any(i.context.cfg.group_by not in ("auto", "prompt")
                                                            for i in inputs)  # fmt: skip
    drafts: dict[str, tuple[Group, list[Candidate]]] = {}
    seen: list[set[str]] = [set() for _ in inputs]
    for part, i, row_id, prompt_hash, cand in reads:
        key = row_id if by_id and row_id is not None else prompt_hash
        part_limit = inputs[part].limit
        if part_limit is not None and key not in seen[part] and len(seen[part]) >= part_limit:
            continue
        seen[part].add(key)
        if key not in drafts:
            drafts[key] = (Group(key, (), row=i, prompt_hash=prompt_hash), [])
        elif key == row_id and drafts[key][0].prompt_hash != prompt_hash:
            ctx = inputs[part].context
            first = drafts[key][0].row + 1
            raise input_error(ctx.file, i, id_column(ctx), f"id {key!r} was first seen at row {first} with a "
                                                           "different prompt; group by prompt with --group-by prompt")
        drafts[key][1].append(cand)
    grouped = finish_groups([g.with_candidates(c) for g, c in list(drafts.values())[:limit]], min_candidates)
    del reads  # before giving its memory back
    release_memory()  # the rows' texts, read to group them
    return replace(grouped, drops=grouped.drops + Drops.of(rows=skipped), skipped=tuple(examples), load=loader(inputs))


def finish_groups(groups: Iterable[Group], min_candidates: int) -> Grouped:
    """Deduplicate identical responses within each group, number candidates, enforce ``min_candidates``."""
    kept, candidates, instructions = [], Counter(), Counter()
    for group in groups:
        unique: dict[bytes, Candidate] = {}
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
