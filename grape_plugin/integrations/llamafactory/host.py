"""LLaMA-Factory as a GRAPE host: the ``dataset_info.json`` entries with a ``grape`` key in, canonical ShareGPT
files and a ``dataset_info.json`` out.

Rows go through LLaMA-Factory's own converter (alpaca, sharegpt, openai), so a prompt is exactly what the run
sees: ``_prompt``, ``_system``, ``_tools`` and the media, kept as the group's ``context`` and grouped through
the core across entries. Candidates are one row each (pooled rows), the items of a list column, or the chosen and
rejected answers of a ranking entry. The scoring model is the run's: LLaMA-Factory's tokenizer and template now,
its ``load_model`` (adapters merged, the run's dtype) only when something is left to score. ``template: train``
scores exactly the ids and labels LLaMA-Factory's SFT preprocessing trains on.
"""

import copy
import json
import logging
import os
import shutil
import sys
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from grape_plugin.host import (
    BaseHost, Candidate, Components, Context, Draft, Format, GrapeConfig, GrapeError, Group, Input, Reason, Rendered,
    Scorer, Selection, default_cache_dir, input_error, labelled_span, output_folder, prepare, read_dataset,
    safe_filename,
)  # fmt: skip

from . import compat

LOG = logging.getLogger("grape_plugin.llamafactory")
LOG.setLevel(logging.INFO)  # the run's log says which selection it trains on
DATA_CONFIG = "dataset_info.json"
RANK_SCRIPT = str(Path(__file__).with_name("__main__.py"))  # what every torchrun rank of ``train`` runs
ALIGNED = ("_prompt", "_system", "_tools", "_images", "_videos", "_audios")
ROLES = {"user": "user", "assistant": "assistant", "observation": "user", "function": "assistant"}
# how LLaMA-Factory reads the rows written: messages with LLaMA-Factory's own roles, every aligned field in a column
SHAREGPT_ENTRY = {
    "formatting": "sharegpt", "ranking": False, "columns": {k[1:]: k[1:] for k in ("_messages", *ALIGNED[1:])},
    "tags": {"role_tag": "role", "content_tag": "content"} | {f"{r}_tag": r for r in (*ROLES, "system")},
}  # fmt: skip
# DataArguments that shape a candidate's tokens, or which instructions are read
DATA_KEYS = ("template", "cutoff_len", "mask_history", "default_system", "tool_format", "enable_thinking",
             "max_samples")  # fmt: skip
# ModelArguments that change the loaded model beyond its files; absent ones (other versions) read as None
MODEL_KEYS = ("quantization_bit", "quantization_method", "quantization_type", "double_quantization", "rope_scaling",
              "flash_attn", "shift_attn", "mixture_of_depths", "use_unsloth", "upcast_layernorm",
              "upcast_lmhead_output", "resize_vocab", "new_special_tokens", "add_tokens", "add_special_tokens",
              "train_from_scratch")  # fmt: skip
# LLaMA-Factory's words for the options the run decides (grape_plugin.host.HOST_DECIDES), and more
HINTS = {"model": "the scoring model is the run's model_name_or_path (with adapter_name_or_path)",
         "revision": "set model_revision in the training config",
         "format": "the entry's formatting and columns say how rows read",
         "response_column": "name the response column under the entry's columns",
         "split": "an entry reads its files' rows; LLaMA-Factory's own \"split\" key is the entry's"}  # fmt: skip


class Entry(Format):
    """One ``dataset_info.json`` entry with a ``grape`` option: its rows through LLaMA-Factory's converter (``attr``
    is its DatasetAttr); rows it would drop at the SFT stage are counted."""

    name = "llamafactory"
    options = frozenset({"source_column", "candidates_column"})

    def __init__(self, entry: str, attr: Any, path: str, convert: Any):
        self.entry, self.attr, self.path, self.convert = entry, attr, path, convert

    def expand(self, row: dict, i: int, col: Optional[str], ctx: Context) -> list[tuple[dict, Optional[int]]]:
        """The row itself, or one row per item of the candidates column (set as the entry's response)."""
        if col is None:
            return [(row, None)]
        items, a = row.get(col), self.attr
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise input_error(ctx.file, i, col, "must be a non-empty list of candidate response strings")
        if a.formatting == "alpaca":
            return [({**row, a.response: x}, j) for j, x in enumerate(items)]
        # the messages column holds the prompt; the item is the last turn
        turns = [[*(row.get(a.messages) or []), {a.role_tag: a.assistant_tag, a.content_tag: x}] for x in items]
        return [({**row, a.messages: t}, j) for j, t in enumerate(turns)]

    def read_row(self, row, i, ctx):
        col, ranking = ctx.cfg.candidates_column, self.attr.ranking
        for one, item in self.expand(row, i, col, ctx):
            try:
                aligned = self.convert(one)
            except KeyError as exc:
                raise input_error(ctx.file, i, str(exc.args[0]), "missing; LLaMA-Factory reads it for this entry "
                                  "(map the columns it has under \"columns\")") from None  # fmt: skip
            responses = aligned["_response"]
            if len(aligned["_prompt"]) % 2 != 1 or len(responses) != (2 if ranking else 1):
                yield Reason.INVALID_EXAMPLE
                continue
            system = [{"role": "system", "content": aligned["_system"]}] if aligned["_system"] else []
            prompt = system + [{"role": ROLES[m["role"]], "content": m["content"]} for m in aligned["_prompt"]]
            context = {k: aligned[k] for k in ALIGNED}
            if ranking:
                sources, items = ("chosen", "rejected"), (0, 1)
            else:
                sources, items = (self.source(row, ctx) or (f"{col}[{item}]" if col else self.entry),), (item,)
            for source, j, answer in zip(sources, items, responses):
                yield Draft(prompt, Candidate(answer["content"], source, i, item=j), context)

    def selected(self, dataset, picks, ctx):
        """Canonical ShareGPT rows (``SHAREGPT_ENTRY``): the prompt as LLaMA-Factory aligned it, the kept answer."""
        from datasets import Dataset

        return Dataset.from_list([{"messages": [*g.context["_prompt"], {"role": "assistant", "content": c.response}],
                                   **{k[1:]: g.context[k] for k in ALIGNED[1:]}} for g, c in picks])  # fmt: skip


def entry_input(name: str, attr: Any, cfg: GrapeConfig, data_args: Any) -> Input:
    """A local entry's rows (a file, or a folder of files), read as that entry."""
    where, path = (os.path.join(data_args.dataset_dir, n) for n in (DATA_CONFIG, attr.dataset_name))
    if attr.load_from != "file":
        raise GrapeError(f"{where}: dataset '{name}' loads from {attr.load_from}; GRAPE selection reads local files "
                         "only (download it and point file_name at it)")  # fmt: skip
    if not os.path.exists(path):
        raise GrapeError(f"{where}: dataset '{name}': file_name {attr.dataset_name}: no such file in "
                         f"{data_args.dataset_dir}")  # fmt: skip
    rows = read_dataset(path)
    entry = Entry(name, attr, path, compat.get_dataset_converter(attr.formatting, attr, data_args))
    ctx = Context(path, list(rows.column_names), cfg)
    entry.check(ctx, None)
    return Input(rows, entry, ctx, data_args.max_samples)


class TrainRenderer:
    """``template: train``: a candidate's ids and labels exactly as the run's SFT preprocessing makes them (its
    template, fixed tokenizer, ``mask_history``, ``efficient_eos``, ...); the scored span is the last labelled run.
    A candidate is rendered whole; ``cut`` truncates it at ``cutoff_len`` as LLaMA-Factory does."""

    def __init__(self, tokenizer: Any, processor: Any, template: Any, data_args: Any):
        scoring, whole = copy.copy(data_args), copy.copy(data_args)
        scoring.train_on_prompt = whole.train_on_prompt = False  # the labels then mark the responses only
        whole.cutoff_len = sys.maxsize
        self.whole, self.short = (compat.sft_encoder(template, tokenizer, processor, d) for d in (whole, scoring))

    def __call__(self, group: Group, cand: Candidate) -> Rendered:
        return labelled_span(*self.whole(group.context, cand.response))

    def cut(self, group: Group, cand: Candidate) -> Optional[Rendered]:
        """The candidate as LLaMA-Factory truncates it; None when the cut lost the final turn."""
        item, short = self(group, cand), labelled_span(*self.short(group.context, cand.response))
        kept = item.input_ids[item.start : item.start + short.n_tokens]
        return short if short.input_ids[short.start : short.end].tolist() == kept.tolist() else None


class LlamaFactoryHost(BaseHost):
    """The GRAPE host contract for one LLaMA-Factory run (see ``grape_plugin.host``): ``inputs`` are its grape
    entries (``Entry``)."""

    log = LOG

    def __init__(self, args: Any, parsed: tuple, info: dict, inputs: list[Input], cfg: GrapeConfig):
        super().__init__(Components.of(cfg, host_template=True))
        self.args, self.info, self.inputs = args, info, inputs
        self.model_args, self.data_args, self.training_args, self.finetuning_args = parsed
        self.where = os.path.join(self.data_args.dataset_dir, DATA_CONFIG)
        self.entries: list[Entry] = [i.format for i in inputs]

    @cached_property
    def tokenizer(self) -> tuple[Any, Any, Any]:
        """The run's tokenizer, processor and template, loaded once (the template may add tokens)."""
        loaded = compat.load_tokenizer(self.model_args)
        template = compat.get_template_and_fix_tokenizer(loaded["tokenizer"], self.data_args)
        return loaded["tokenizer"], loaded["processor"], template

    def scorer(self) -> Scorer:
        m, f, t, tokenizer = self.model_args, self.finetuning_args, self.training_args, self.tokenizer[0]
        weights = [(m.model_name_or_path, m.model_revision), *((n, None) for n in m.adapter_name_or_path or [])]
        settings = {"finetuning_type": f.finetuning_type, **{k: getattr(m, k, None) for k in MODEL_KEYS},
                    "dtype": f"bf16={t.bf16 or f.pure_bf16},fp16={t.fp16},infer={m.infer_dtype}"}  # fmt: skip
        return self.model_scorer("llamafactory", tokenizer, weights, settings,
                                 lambda: compat.load_model(tokenizer, copy.deepcopy(m), f, is_trainable=False))

    def key_parts(self) -> Mapping[str, Any]:
        d = self.data_args
        return {**super().key_parts(), "llamafactory": compat.VERSION, "info": self.info, "media_dir": d.media_dir,
                "dataset_dir": os.path.abspath(d.dataset_dir), "data": {k: getattr(d, k, None) for k in DATA_KEYS}}

    def train_renderer(self, scorer: Scorer) -> TrainRenderer:
        return TrainRenderer(*self.tokenizer, self.data_args)  # the scorer's tokenizer is self.tokenizer's

    def folder(self, key: str) -> Path:
        return Path(self.cfg.cache_dir or default_cache_dir()) / "llamafactory" / key

    def part_file(self, part: int) -> str:
        return safe_filename(self.entries[part].entry, ".jsonl")

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        """``<entry>.jsonl`` per grape entry that kept any row, and a ``dataset_info.json`` pointing those entries at
        them; every other entry stays as it was, with paths made absolute."""
        files = super().write(selection, folder)
        info = {name: absolute_entry(entry, self.data_args.dataset_dir) for name, entry in self.info.items()}
        for part, name in enumerate(e.entry for e in self.entries):
            if (path := folder / self.part_file(part)) in files.values():
                num = {"num_samples": n} if (n := self.info[name].get("num_samples")) is not None else {}
                info[name] = {"file_name": path.name, **SHAREGPT_ENTRY, **num}
        (folder / DATA_CONFIG).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return {"dataset_info": folder / DATA_CONFIG, **files}

    def is_writer(self) -> bool:
        """One writer per node, or one in all with ``data_shared_file_system``."""
        t = self.training_args
        return (t.process_index if self.data_args.data_shared_file_system else t.local_process_index) == 0

    def redirect(self, folder: Path) -> Any:
        """The run's arguments with ``dataset_dir`` at the selection (``media_dir`` stays the original one); an entry
        none of whose candidates won is left out, with a warning."""
        empty = {e.entry for e, path in zip(self.entries, self.kept_parts(folder)) if path is None}
        updates = {"dataset_dir": str(folder), "media_dir": self.data_args.media_dir,
                   "dataset": ",".join(n for n in self.data_args.dataset if n not in empty)}  # fmt: skip
        if isinstance(self.args, dict):
            return {**self.args, **updates}
        return [*self.args, *chain.from_iterable((f"--{k}", v) for k, v in updates.items())]  # argparse: last one wins


def absolute_entry(entry: dict[str, Any], dataset_dir: str) -> dict[str, Any]:
    """An entry that reads the same files from any ``dataset_dir``."""
    paths = {key: os.path.join(dataset_dir, entry[key]) for key in ("file_name", "script_url") if key in entry}
    return {**entry, **{key: os.path.abspath(path) for key, path in paths.items() if os.path.exists(path)}}


def plan(args: Any) -> Optional[LlamaFactoryHost]:
    """The run's grape entries as a host, validated; None when there are none (the run trains as it would anyway)."""
    m, d, t, f = compat.parse_train_args(args)
    info_path = os.path.join(d.dataset_dir, DATA_CONFIG)
    if d.dataset_dir == "ONLINE" or d.dataset_dir.startswith("REMOTE:") or not os.path.isfile(info_path):
        return None
    try:
        info = json.loads(Path(info_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GrapeError(f"{info_path}: cannot read it: {exc}") from None
    grape = {n: info[n].get("grape") for n in d.dataset or [] if isinstance(info.get(n), dict)}
    # the defaults differ from the CLI's (template: train too), so that a winner the run would cut is never picked
    defaults, limit = {"max_length": d.cutoff_len}, ("cutoff_len", d.cutoff_len)
    options = {n: c for n, g in grape.items()
               if (c := BaseHost.options(g, defaults, f"{info_path}: dataset '{n}': grape", HINTS, limit))}
    for name in (n for n in d.eval_dataset or [] if isinstance(info.get(n), dict) and info[n].get("grape")):
        LOG.warning("eval dataset '%s' has a grape option: GRAPE selects training data; it is used as is", name)
    if not options:
        return None
    if f.stage != "sft":
        raise GrapeError(f"{info_path}: GRAPE selects SFT data, but this run's stage is '{f.stage}'; "
                         f"use stage: sft or drop the grape option of {', '.join(options)}")  # fmt: skip
    if d.tokenized_path and compat.has_tokenized_data(d.tokenized_path):
        LOG.warning("tokenized_path %s exists, so LLaMA-Factory trains on it and reads no dataset: GRAPE selection "
                    "skipped. Delete it (or choose a new tokenized_path) to train on the selection.", d.tokenized_path)
        return None
    d.media_dir = os.path.abspath(d.media_dir)  # media paths are written absolute
    inputs = [entry_input(n, a, options[n], d) for n, a in zip(options, compat.get_dataset_list(list(options), info))]
    return LlamaFactoryHost(args, (m, d, t, f), info, inputs, BaseHost.shared_options(options, info_path))


def selected(host: LlamaFactoryHost) -> Any:
    """On every rank: the run's arguments pointing at the host's selection (made, or found on disk)."""
    _ = host.training_args.device  # under torchrun this starts the process group LLaMA-Factory's trainer uses
    return host.redirect(prepare(host).folder)


def train(argv: list[str]) -> int:
    """Select, then train, as ``llamafactory-cli train`` does: under torchrun where it would, every rank selecting."""
    host = plan(compat.read_args(argv))  # a bad option fails here, once, before any rank starts
    return compat.launch(argv, RANK_SCRIPT, lambda args: selected(host) if host else args)


def train_rank(argv: list[str]) -> None:
    """One torchrun rank of ``train``: select (sharing the scoring), then train."""
    host = plan(args := compat.read_args(argv))
    compat.run_exp(selected(host) if host else args)


def select(argv: list[str], out: str) -> str:
    """The selection (from the cache, or selected now) copied to ``out`` for a plain ``llamafactory-cli train``;
    the command that trains on it."""
    host = plan(compat.read_args(argv))
    if host is None:
        raise GrapeError("nothing to select: no dataset of this run has a 'grape' key in its dataset_info.json entry")
    target = output_folder(out, [Path(host.where), *(Path(e.path) for e in host.entries)])
    shutil.copytree(prepare(host).folder, target, dirs_exist_ok=True)
    args = host.redirect(target)
    if isinstance(args, list):
        return "llamafactory-cli train " + " ".join(args)
    (target / "train.yaml").write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return f"llamafactory-cli train {target / 'train.yaml'}"
