"""Read ``dataset_info.json`` entries as LLaMA-Factory reads them, into GRAPE groups; write a selection back.

Rows go through LLaMA-Factory's own converter (alpaca, sharegpt, openai), so a prompt is exactly what the
run would see: ``_prompt``, ``_system``, ``_tools`` and the media. Candidates are one row each (pooled rows),
the items of a list column, or the chosen and rejected answers of a ranking entry. The selection is written as
canonical ShareGPT rows (``messages``/``system``/``tools``/media), which the converter reads back unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from grape_plugin.candidates import Candidate, Drops, Group, prompt_key
from grape_plugin.config import GrapeConfig
from grape_plugin.datafiles import safe_filename
from grape_plugin.errors import GrapeError, input_error
from grape_plugin.formats import SOURCE_COLUMNS
from grape_plugin.pipeline import Selection

ALIGNED = ("_prompt", "_system", "_tools", "_images", "_videos", "_audios")
# roles of LLaMA-Factory's aligned prompts, as the chat messages the other templates (paper, chat) read
ROLES = {"user": "user", "assistant": "assistant", "observation": "user", "function": "assistant"}
SHAREGPT_ENTRY = {
    "formatting": "sharegpt",
    "ranking": False,
    "columns": {k: k for k in ("messages", "system", "tools", "images", "videos", "audios")},
    "tags": {
        "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
        "observation_tag": "observation", "function_tag": "function", "system_tag": "system",
    },
}  # fmt: skip


class AlignedPrompt(list):
    """A prompt as chat messages that also carries LLaMA-Factory's aligned fields, for the train renderer."""

    def __init__(self, aligned: dict[str, Any]):
        system = [{"role": "system", "content": aligned["_system"]}] if aligned["_system"] else []
        super().__init__(system + [{"role": ROLES[m["role"]], "content": m["content"]} for m in aligned["_prompt"]])
        self.aligned = aligned

    def key(self) -> str:
        return prompt_key([{"role": k, "content": json.dumps(self.aligned[k], sort_keys=True)} for k in ALIGNED])


@dataclass
class Entry:
    """One ``dataset_info.json`` entry with a ``grape`` option, and its rows as loaded from disk."""

    name: str
    info: dict[str, Any]
    attr: Any  # llamafactory DatasetAttr
    cfg: GrapeConfig
    files: list[str]
    rows: Any = None

    def identity(self) -> list:
        """What the entry's selection depends on: its options and the data files (path, size, mtime)."""
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        return [self.name, self.info, stats]


def entry_files(name: str, attr: Any, dataset_dir: str, where: str) -> list[str]:
    """The data files of a local entry, listed as LLaMA-Factory lists them (a file, or a folder's files)."""
    if attr.load_from != "file":
        raise GrapeError(
            f"{where}: dataset '{name}' loads from {attr.load_from}; GRAPE selection reads local files only "
            "(download it and point file_name at it)"
        )
    path = os.path.abspath(os.path.join(dataset_dir, attr.dataset_name))
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in os.listdir(path)]
    if not os.path.isfile(path):
        raise GrapeError(f"{where}: dataset '{name}': file_name {attr.dataset_name}: no such file in {dataset_dir}")
    return [path]


def load_rows(entry: Entry) -> Any:
    """The entry's rows (its ``split``), read like LLaMA-Factory reads them, with errors naming file and row."""
    import datasets
    from llamafactory.extras.constants import FILEEXT2TYPE

    from grape_plugin.datafiles import find_bad_json

    kinds = {FILEEXT2TYPE.get(os.path.splitext(f)[1][1:]) for f in entry.files}
    if len(kinds) != 1 or None in kinds:
        raise GrapeError(f"dataset '{entry.name}': expected files of one type ({', '.join(FILEEXT2TYPE)})")
    kind = kinds.pop()
    try:
        return datasets.load_dataset(kind, data_files=entry.files, split=entry.attr.split)
    except Exception as exc:  # datasets raises many types; name the bad row where we can
        if kind == "json":
            for f in entry.files:
                find_bad_json(Path(f))
        raise GrapeError(f"dataset '{entry.name}': cannot read {', '.join(entry.files)}: {exc}") from None


def column(entry: Entry, option: str, named: Optional[str], defaults: tuple[str, ...] = ()) -> Optional[str]:
    """The column an option names (which must exist), else the first default present."""
    columns = entry.rows.column_names
    if named is not None and named not in columns:
        raise GrapeError(
            f"{entry.files[0]}: grape option {option} names column '{named}', which dataset '{entry.name}' "
            f"lacks; its columns are {', '.join(columns)}"
        )
    return named or next((c for c in defaults if c in columns), None)


def expand(row: dict, i: int, entry: Entry, list_col: Optional[str]) -> Iterator[tuple[dict, Optional[str]]]:
    """The row itself, or one row per item of the candidates column (set as the entry's response)."""
    if list_col is None:
        yield row, None
        return
    items = row.get(list_col)
    if not isinstance(items, list) or not items:
        raise input_error(entry.files[0], i, list_col, "must be a non-empty list of candidate responses")
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise input_error(entry.files[0], i, f"{list_col}[{j}]", "must be a string")
        one = dict(row)
        if entry.attr.formatting == "alpaca":
            one[entry.attr.response] = item
        else:  # the messages column holds the prompt; the item is the last turn
            last = {entry.attr.role_tag: entry.attr.assistant_tag, entry.attr.content_tag: item}
            one[entry.attr.messages] = list(row.get(entry.attr.messages) or []) + [last]
        yield one, f"{list_col}[{j}]"


def read_entries(entries: list[Entry], data_args: Any, drops: Drops) -> list[Group]:
    """Every entry's candidates, grouped across entries by the id column, else by the exact aligned prompt.

    A row LLaMA-Factory would drop at the SFT stage (an even number of prompt turns, no response) is counted
    as ``candidate:invalid_example``. ``max_samples`` keeps the first N instructions of each entry.
    """
    from llamafactory.data.converter import get_dataset_converter

    data_args = copy.copy(data_args)
    data_args.media_dir = os.path.abspath(data_args.media_dir)  # media paths are written absolute
    groups: dict[str, Group] = {}
    for entry in entries:
        entry.rows = load_rows(entry)
        convert = get_dataset_converter(entry.attr.formatting, entry.attr, data_args)
        id_col = column(entry, "id_column", entry.cfg.id_column, ("id",))
        source_col = column(entry, "source_column", entry.cfg.source_column, SOURCE_COLUMNS)
        list_col = column(entry, "candidates_column", entry.cfg.candidates_column)
        seen: set[str] = set()
        limit = data_args.max_samples
        for i, row in enumerate(entry.rows):
            for one, slot in expand(row, i, entry, list_col):
                try:
                    aligned = convert(one)
                except KeyError as exc:
                    raise input_error(
                        entry.files[0], i, str(exc.args[0]),
                        "missing; LLaMA-Factory reads it for this entry (map the columns it has under \"columns\")",
                    ) from None  # fmt: skip
                responses = aligned["_response"]
                if len(aligned["_prompt"]) % 2 != 1 or len(responses) != (2 if entry.attr.ranking else 1):
                    drops.candidate("invalid_example")
                    continue
                prompt = AlignedPrompt({k: aligned[k] for k in ALIGNED})
                key = str(row[id_col]) if id_col and row.get(id_col) is not None else prompt.key()
                if key not in seen and limit is not None and len(seen) >= limit:
                    continue
                seen.add(key)
                group = groups.setdefault(key, Group(key, prompt, row=i))
                if group.prompt.aligned != prompt.aligned:
                    raise input_error(entry.files[0], i, id_col, f"id {key!r} was seen before with a different prompt")
                slots = ("chosen", "rejected") if entry.attr.ranking else (slot,)
                for response, which in zip(responses, slots):
                    if not entry.attr.ranking and source_col and row.get(source_col) is not None:
                        which = str(row[source_col])
                    group.candidates.append(Candidate(response["content"], which or entry.name, i, slot=entry.name))
    return list(groups.values())


def fit_max_samples(selection: Selection, max_samples: Optional[int]) -> None:
    """Keep whole instructions only, so LLaMA-Factory's own ``max_samples`` cut (per entry) never bites."""
    if max_samples is None:
        return
    by_group: dict[str, list[Candidate]] = {}
    for group, cand in selection.picks():
        by_group.setdefault(group.key, []).append(cand)
    per_entry: Counter = Counter()
    for key, cands in by_group.items():
        counts = per_entry + Counter(c.slot for c in cands)
        if max(counts.values()) > max_samples:
            del selection.kept[key]
            selection.drops.instruction("over_max_samples")
            selection.drops.candidate("over_max_samples", len(cands))
        else:
            per_entry = counts


def training_row(group: Group, cand: Candidate) -> dict[str, Any]:
    """A selected candidate as a canonical ShareGPT row."""
    a = group.prompt.aligned
    messages = a["_prompt"] + [{"role": "assistant", "content": cand.response}]
    return {"messages": messages, "system": a["_system"], "tools": a["_tools"],
            "images": a["_images"], "videos": a["_videos"], "audios": a["_audios"]}  # fmt: skip


def absolute_entry(entry: dict[str, Any], dataset_dir: str) -> dict[str, Any]:
    """An entry that reads the same files from any ``dataset_dir``."""
    entry = dict(entry)
    for key in ("file_name", "script_url"):
        if key in entry and os.path.exists(path := os.path.join(dataset_dir, entry[key])):
            entry[key] = os.path.abspath(path)
    return entry


def write_selection(
    out: Path, info: dict[str, Any], dataset_dir: str, entries: list[Entry], selection: Selection
) -> None:
    """Write ``<entry>.jsonl`` per grape entry (rows in input order) and a ``dataset_info.json`` that keeps every
    other entry; an entry none of whose candidates won gets an empty file."""
    out.mkdir(parents=True, exist_ok=True)
    by_entry: dict[str, list[tuple[int, dict]]] = {e.name: [] for e in entries}
    for group, cand in selection.picks():
        by_entry[cand.slot].append((cand.row, training_row(group, cand)))
    new_info = {name: absolute_entry(entry, dataset_dir) for name, entry in info.items()}
    for e in entries:
        new_info[e.name] = {"file_name": safe_filename(e.name, ".jsonl"), **SHAREGPT_ENTRY}
        if e.info.get("num_samples") is not None:
            new_info[e.name]["num_samples"] = e.info["num_samples"]
        with open(out / safe_filename(e.name, ".jsonl"), "w", encoding="utf-8") as fh:
            for _, row in sorted(by_entry[e.name], key=lambda r: r[0]):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "dataset_info.json").write_text(json.dumps(new_info, indent=2, ensure_ascii=False) + "\n")
