"""LLaMA-Factory as a GRAPE host: the ``dataset_info.json`` entries with a ``grape`` key in, canonical ShareGPT
files and a ``dataset_info.json`` out.

Rows go through LLaMA-Factory's own converter (alpaca, sharegpt, openai), so a prompt is exactly what the run
sees: ``_prompt``, ``_system``, ``_tools`` and the media, kept as the group's ``context`` and grouped through
the core across entries. Candidates are one row each (pooled rows), the items of a list column, or the chosen and
rejected answers of a ranking entry. The scoring model is the run's: LLaMA-Factory's tokenizer and template now,
its ``load_model`` (adapters merged, the run's dtype) only when something is left to score. ``template: train``
scores exactly the ids and labels LLaMA-Factory's SFT preprocessing trains on.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional

from grape_plugin.components import Components
from grape_plugin.config import GrapeConfig, default_cache_dir
from grape_plugin.datafiles import safe_filename
from grape_plugin.errors import GrapeError, input_error
from grape_plugin.formats import Context, Format, Input, group_rows
from grape_plugin.host import BaseHost
from grape_plugin.records import Candidate, Draft, Drops, Group, Grouped, Reason, Selection
from grape_plugin.render import Rendered, Renderer, labelled_span
from grape_plugin.scoring import Scorer

from .compat import dataset_converter, load_model, load_tokenizer_and_template, sft_encoder, version

DATA_CONFIG = "dataset_info.json"
MEDIA = ("images", "videos", "audios")
ALIGNED = ("_prompt", "_system", "_tools", *(f"_{m}" for m in MEDIA))
ROLES = {"user": "user", "assistant": "assistant", "observation": "user", "function": "assistant"}
SHAREGPT_ENTRY = {
    "formatting": "sharegpt", "ranking": False, "columns": {k: k for k in ("messages", "system", "tools", *MEDIA)},
    "tags": {f"{role}_tag": role for role in ("user", "assistant", "observation", "function", "system")}
            | {"role_tag": "role", "content_tag": "content"},
}  # fmt: skip
# DataArguments that shape a candidate's tokens, or which instructions are read
DATA_KEYS = ("template", "cutoff_len", "mask_history", "default_system", "tool_format", "enable_thinking", "max_samples")
# ModelArguments that change the loaded model beyond its files; absent ones (other versions) read as None
MODEL_KEYS = (
    "quantization_bit", "quantization_method", "quantization_type", "double_quantization", "rope_scaling",
    "flash_attn", "shift_attn", "mixture_of_depths", "use_unsloth", "upcast_layernorm", "upcast_lmhead_output",
    "resize_vocab", "new_special_tokens", "add_tokens", "add_special_tokens", "train_from_scratch",
)  # fmt: skip
HINTS = {  # LLaMA-Factory's words for the options the run decides (grape_plugin.host.HOST_DECIDES), and more
    "model": "the scoring model is the run's model_name_or_path (with adapter_name_or_path)",
    "revision": "set model_revision in the training config",
    "trust_remote_code": "set trust_remote_code in the training config",
    "dtype": "the run's bf16/fp16/infer_dtype decide the dtype",
    "format": "the entry's formatting and columns say how rows read",
    "response_column": "name the response column under the entry's columns",
    "split": "an entry reads its files' rows; LLaMA-Factory's own \"split\" key is the entry's",
}
READING_KEYS = ("group_by", "source_column", "candidates_column", "on_bad_row")  # how one entry's rows read: may differ


def entry_config(raw: Any, where: str, cutoff_len: int) -> Optional[GrapeConfig]:
    """An entry's ``grape`` value (``true`` or ``{}`` for the defaults), or None when absent or false.

    Defaults differ from the CLI's: ``template: train`` and ``max_length: cutoff_len``, so a winner the run would
    cut is never picked silently.
    """
    if raw is None or raw is False:
        return None
    cfg = BaseHost.options(raw, {"max_length": cutoff_len}, where, HINTS)
    if cfg.max_length is not None and cfg.max_length > cutoff_len:
        raise GrapeError(f"{where}: max_length {cfg.max_length} exceeds the run's cutoff_len {cutoff_len}; "
                         "LLaMA-Factory would truncate longer winners")  # fmt: skip
    return cfg


def shared_config(options: dict[str, GrapeConfig], where: str) -> GrapeConfig:
    """The options of entries selected together (grouped by prompt across them): equal but for the reading keys."""
    (first, cfg), *rest = options.items()
    for name, other in rest:
        for key in GrapeConfig.model_fields:
            if key not in READING_KEYS and getattr(other, key) != getattr(cfg, key):
                raise GrapeError(
                    f"{where}: datasets '{first}' and '{name}' are selected together (candidates are grouped by "
                    f"prompt across them) but their grape options differ in '{key}' "
                    f"({getattr(cfg, key)!r} vs {getattr(other, key)!r}); make them equal"
                )
    return cfg


@dataclass(frozen=True)
class Entry:
    """One ``dataset_info.json`` entry with a ``grape`` option: its info, LLaMA-Factory's DatasetAttr, its files."""

    name: str
    info: dict[str, Any]
    attr: Any
    cfg: GrapeConfig
    files: list[str]

    def identity(self) -> list:
        """What the entry's selection depends on: its info and its files (path, size, mtime)."""
        return [self.name, self.info, [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]]

    def rows(self) -> Any:
        """Its rows (a file, or a folder's files), with errors naming file and row."""
        from datasets import concatenate_datasets

        from grape_plugin.datafiles import read_dataset

        parts = [read_dataset(f) for f in self.files]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


class EntryRows(Format):
    """One entry's rows through LLaMA-Factory's converter; rows it would drop at the SFT stage are counted."""

    name = "llamafactory"

    def __init__(self, entry: Entry, convert: Any):
        self.entry, self.convert, self.invalid = entry, convert, 0

    def expand(self, row: dict, i: int, col: Optional[str], ctx: Context) -> Any:
        """The row itself, or one row per item of the candidates column (set as the entry's response)."""
        if col is None:
            yield row, None
            return
        items, attr = row.get(col), self.entry.attr
        if not isinstance(items, list) or not items:
            raise input_error(ctx.file, i, col, "must be a non-empty list of candidate responses")
        for j, item in enumerate(items):
            if not isinstance(item, str):
                raise input_error(ctx.file, i, f"{col}[{j}]", "must be a string")
            if attr.formatting == "alpaca":
                yield {**row, attr.response: item}, j
            else:  # the messages column holds the prompt; the item is the last turn
                last = {attr.role_tag: attr.assistant_tag, attr.content_tag: item}
                yield {**row, attr.messages: [*(row.get(attr.messages) or []), last]}, j

    def read_row(self, row, i, ctx):
        col, ranking = ctx.first((), ctx.cfg.candidates_column), self.entry.attr.ranking
        for one, item in self.expand(row, i, col, ctx):
            try:
                aligned = self.convert(one)
            except KeyError as exc:
                raise input_error(ctx.file, i, str(exc.args[0]), "missing; LLaMA-Factory reads it for this entry "
                                  "(map the columns it has under \"columns\")") from None  # fmt: skip
            responses = aligned["_response"]
            if len(aligned["_prompt"]) % 2 != 1 or len(responses) != (2 if ranking else 1):
                self.invalid += 1
                continue
            system = [{"role": "system", "content": aligned["_system"]}] if aligned["_system"] else []
            prompt = system + [{"role": ROLES[m["role"]], "content": m["content"]} for m in aligned["_prompt"]]
            context = {k: aligned[k] for k in ALIGNED}
            if ranking:
                for j, (slot, answer) in enumerate(zip(("chosen", "rejected"), responses)):
                    yield Draft(prompt, Candidate(answer["content"], slot, i, item=j), context)
            else:
                source = self.source(row, ctx) or (self.entry.name if item is None else f"{col}[{item}]")
                yield Draft(prompt, Candidate(responses[0]["content"], source, i, item=item), context)


class TrainRenderer:
    """``template: train``: a candidate's ids and labels exactly as the run's SFT preprocessing makes them (its
    template, fixed tokenizer, ``mask_history``, ``efficient_eos``, ...); the scored span is the last labelled run.

    A candidate longer than ``cutoff_len`` is rendered whole, so ``max_length`` drops it, or, with ``over_length:
    truncate``, as LLaMA-Factory truncates it (counted in ``truncated``).
    """

    def __init__(self, template: Any, tokenizer: Any, processor: Any, data_args: Any, over_length: str):
        scoring = copy.copy(data_args)
        scoring.train_on_prompt = False  # the labels then mark the responses only
        whole = copy.copy(scoring)
        whole.cutoff_len = sys.maxsize
        self.cut = sft_encoder(template, tokenizer, processor, scoring)
        self.whole = sft_encoder(template, tokenizer, processor, whole)
        self.cutoff_len, self.truncate, self.truncated = data_args.cutoff_len, over_length == "truncate", 0

    def __call__(self, group: Group, cand: Candidate) -> Rendered:
        item = labelled_span(*self.whole(group.context, cand.response))
        if len(item.input_ids) <= self.cutoff_len or not self.truncate:
            return item
        short = labelled_span(*self.cut(group.context, cand.response))
        if short.input_ids[short.start : short.end].tolist() != item.input_ids[item.start : item.start + short.n_tokens].tolist():
            return item  # the cut lost the final turn: max_length decides
        self.truncated += 1
        return short


class LlamaFactoryHost(BaseHost):
    """The GRAPE host contract for one LLaMA-Factory run (see ``grape_plugin.host``)."""

    def __init__(self, args: Any, parsed: tuple, info_path: str, info: dict, entries: list[Entry], cfg: GrapeConfig):
        super().__init__(Components.of(cfg, host_template=True))
        self.args, self.info_path, self.info, self.entries = args, info_path, info, entries
        self.model_args, self.data_args, self.training_args, self.finetuning_args = parsed
        self.where = info_path
        self.trained: Optional[TrainRenderer] = None

    @cached_property
    def tokenizer(self) -> tuple[Any, Any, Any]:
        """The run's tokenizer, processor and template, loaded once (the template may add tokens)."""
        return load_tokenizer_and_template(self.model_args, self.data_args)

    def scorer(self) -> Scorer:
        m, f, t = self.model_args, self.finetuning_args, self.training_args
        tokenizer = self.tokenizer[0]
        weights = [(m.model_name_or_path, m.model_revision), *((n, None) for n in m.adapter_name_or_path or [])]
        settings = {"finetuning_type": f.finetuning_type, **{k: getattr(m, k, None) for k in MODEL_KEYS},
                    "dtype": f"bf16={t.bf16 or f.pure_bf16},fp16={t.fp16},infer={m.infer_dtype}"}  # fmt: skip
        return self.model_scorer("llamafactory", tokenizer, weights, settings, lambda: load_model(tokenizer, m, f))

    def key_parts(self) -> Mapping[str, Any]:
        d = self.data_args
        return {
            "llamafactory": version(),
            "entries": [e.identity() for e in self.entries],
            "info": self.info,
            "dirs": [os.path.abspath(d.dataset_dir), os.path.abspath(d.media_dir)],
            "data": {k: getattr(d, k, None) for k in DATA_KEYS},
        }

    def read(self) -> Grouped:
        """Every entry's candidates, grouped across entries; ``max_samples`` reads the first N instructions of each."""
        d = copy.copy(self.data_args)
        d.media_dir = os.path.abspath(d.media_dir)  # media paths are written absolute
        inputs = []
        for e in self.entries:
            rows = e.rows()
            ctx = Context(e.files[0], list(rows.column_names), e.cfg)
            named_columns = {"group_by": None if e.cfg.group_by in ("auto", "prompt") else e.cfg.group_by,
                             "source_column": e.cfg.source_column, "candidates_column": e.cfg.candidates_column}
            for option, named in named_columns.items():
                if named is not None and named not in ctx.columns:
                    raise GrapeError(f"{ctx.file}: grape option {option} names column '{named}', which dataset "
                                     f"'{e.name}' lacks; its columns are {', '.join(ctx.columns)}")  # fmt: skip
            fmt = EntryRows(e, dataset_converter(e.attr, d))
            inputs.append(Input(rows, fmt, ctx, d.max_samples))
        grouped = group_rows(inputs, self.cfg.min_candidates)
        invalid = Drops.of({Reason.INVALID_EXAMPLE: sum(i.format.invalid for i in inputs)})
        return replace(grouped, drops=grouped.drops + invalid)

    def train_renderer(self, scorer: Scorer) -> Renderer:
        _, processor, template = self.tokenizer
        self.trained = TrainRenderer(template, scorer.tokenizer, processor, self.data_args, self.cfg.over_length)
        return self.trained

    def finish(self, selection: Selection) -> Selection:
        """Count LLaMA-Factory's truncations; cap each entry at ``max_samples`` rows with whole instructions only,
        so LLaMA-Factory's own ``max_samples`` cut never splits one."""
        from grape_plugin.distributed import all_gather

        truncated = sum(all_gather([self.trained.truncated])) if self.trained else 0  # the ranks' shares
        if truncated:
            selection = replace(selection, stats=replace(selection.stats, truncated=selection.stats.truncated + truncated))
        limit = self.data_args.max_samples
        return selection if limit is None else selection.capped(limit, Reason.OVER_MAX_SAMPLES)

    def folder(self, key: str) -> Path:
        return Path(self.cfg.cache_dir or default_cache_dir()) / "llamafactory" / key

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        """``<entry>.jsonl`` per grape entry (canonical ShareGPT rows, in input order; empty when nothing of it won)
        and a ``dataset_info.json`` that keeps every other entry, with paths made absolute."""
        rows: list[list[dict]] = [[] for _ in self.entries]
        for group, cand in selection.picks_in_order(texts=True):
            a = group.context
            messages = [*a["_prompt"], {"role": "assistant", "content": cand.response}]
            rows[cand.part].append({"messages": messages, **{k[1:]: a[k] for k in ALIGNED[1:]}})
        info = {name: absolute_entry(entry, self.data_args.dataset_dir) for name, entry in self.info.items()}
        for e, kept in zip(self.entries, rows):
            num = {"num_samples": e.info["num_samples"]} if e.info.get("num_samples") is not None else {}
            info[e.name] = {"file_name": safe_filename(e.name, ".jsonl"), **SHAREGPT_ENTRY, **num}
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
            (folder / info[e.name]["file_name"]).write_text(text, encoding="utf-8")
        (folder / DATA_CONFIG).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return {"dataset_info": folder / DATA_CONFIG, **{e.name: folder / info[e.name]["file_name"] for e in self.entries}}

    def is_writer(self) -> bool:
        """One writer per node, or one in all with ``data_shared_file_system``."""
        t = self.training_args
        return (t.process_index if self.data_args.data_shared_file_system else t.local_process_index) == 0


def absolute_entry(entry: dict[str, Any], dataset_dir: str) -> dict[str, Any]:
    """An entry that reads the same files from any ``dataset_dir``."""
    entry = dict(entry)
    for key in ("file_name", "script_url"):
        if key in entry and os.path.exists(path := os.path.join(dataset_dir, entry[key])):
            entry[key] = os.path.abspath(path)
    return entry
