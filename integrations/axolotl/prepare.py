"""Swap an Axolotl run's ``datasets:`` for the GRAPE selection, computed once per selection key.

Every entry is read as Axolotl reads it; candidates are grouped across entries (pooled data often comes as
one file per generator), scored with the run's base model and selected. The kept rows are written, in each
entry's own shape, to ``{dataset_prepared_path}/grape/{key}/`` with ``scores.jsonl``, ``report.json`` and
``selection.json``, and ``cfg.datasets`` is pointed at them; Axolotl then tokenises and caches them as usual.
The key covers the rows, the model, the ``grape:`` block and the Axolotl settings that shape the tokens, so an
unchanged run reuses the folder without loading the model, and a changed one selects afresh.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import grape_plugin
from grape_plugin.candidates import Candidate, Drops, Group, Message, prompt_key
from grape_plugin.config import GrapeConfig
from grape_plugin.errors import GrapeError
from grape_plugin.formats import Context, Format, detect_format, group_rows
from grape_plugin.models import files_identity
from grape_plugin.pipeline import Selection, run_groups, write_report
from grape_plugin.plugins import registry
from grape_plugin.render import Renderer

from .args import HOST_TEMPLATE
from .render import entry_strategy, train_renderer

# Axolotl's logging config shows INFO only for loggers named axolotl.*
LOG = logging.getLogger("axolotl.integrations.grape_plugin")

MANIFEST = "selection.json"
DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
# Axolotl settings that shape the tokens and labels a candidate is scored on
TOKENIZING_KEYS = (
    "tokenizer_config", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy", "chat_template",
    "chat_template_jinja", "default_system_message", "special_tokens", "tokens", "added_tokens_overrides",
    "sequence_len", "train_on_inputs", "excess_length_strategy",
)  # fmt: skip
# entry keys that say where the original rows come from; the rewritten entry points at the selection instead
SOURCE_KEYS = ("path", "ds_type", "data_files", "split", "name", "revision", "weight")
UNSUPPORTED_ENTRY_KEYS = ("shards", "preprocess_shards")
UNKEYED_OPTIONS = {"cache_dir", "batch_tokens", "device"}  # where and how fast, not what is selected


@dataclass
class Entry:
    """One ``datasets:`` entry: its config, its rows as Axolotl loads them, and how they read as candidates."""

    index: int
    config: Any
    rows: Any
    fmt: Format
    ctx: Context
    offset: int  # the number of its first row among all entries' rows
    digest: str

    def local(self, cand: Candidate) -> Candidate:
        return replace(cand, row=cand.row - self.offset)

    def training_row(self, group: Group, cand: Candidate) -> dict:
        """The row written, and so trained on, for ``cand``."""
        return self.fmt.selected(self.rows, [(group, self.local(cand))], self.ctx)[0]


class Pooled(Format):
    """All entries as one input: rows numbered across entries, each read by its own entry's format."""

    name = "axolotl-datasets"

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.starts = [e.offset for e in entries]

    def entry(self, row: int) -> Entry:
        return self.entries[bisect.bisect_right(self.starts, row) - 1]

    def read_row(self, row: dict, i: int, ctx: Context) -> Iterator[tuple[list[Message], Candidate]]:
        entry = self.entry(i)
        for prompt, cand in entry.fmt.read_row(row, i - entry.offset, entry.ctx):
            yield prompt, replace(cand, row=i)


def grape_config(cfg: Any) -> GrapeConfig:
    """The ``grape:`` block over the run's defaults: its base model, revision, dtype, device and sequence_len."""
    truncate = str(cfg.excess_length_strategy or "drop").lower() == "truncate"
    defaults = {
        "model": cfg.base_model,
        "revision": cfg.revision_of_model,
        "trust_remote_code": bool(cfg.trust_remote_code),
        "template": HOST_TEMPLATE,
        "max_length": cfg.sequence_len,
        "over_length": "truncate" if truncate else "drop",
        "dtype": DTYPES.get(str(cfg.torch_dtype), "auto"),
        "device": cfg.device or "auto",
    }
    return GrapeConfig.from_mapping({**defaults, **dict(cfg.grape)}, where="grape")


def check_run(cfg: Any) -> None:
    """Refuse what GRAPE cannot select for, rather than silently training on unselected data."""
    if cfg.rl:
        raise GrapeError(f"grape: selects SFT data; this run has rl: {cfg.rl} (remove the grape: block)")
    if cfg.pretraining_dataset:
        raise GrapeError("grape: selects SFT datasets:, not a pretraining_dataset (remove the grape: block)")
    if not cfg.datasets:
        raise GrapeError("grape: the config has no datasets: to select from")


def row_digest(rows: Any) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def load_entries(cfg: Any, gcfg: GrapeConfig) -> list[Entry]:
    """Every ``datasets:`` entry's rows, exactly as Axolotl loads them (same features, same None-filling)."""
    from axolotl.utils.data.shared import load_dataset_with_config
    from datasets import DatasetDict, IterableDatasetDict

    formats = registry("formats")
    entries: list[Entry] = []
    offset = 0
    for i, entry_cfg in enumerate(cfg.datasets):
        where = f"datasets[{i}] ({entry_cfg.path})"
        for key in UNSUPPORTED_ENTRY_KEYS:
            if entry_cfg.get(key):
                raise GrapeError(f"{where}: {key}: is not supported with grape: (the selection needs whole groups)")
        if isinstance(entry_cfg.name, list):
            raise GrapeError(f"{where}: a list of name: configs is not supported with grape:; use one entry each")
        rows = load_dataset_with_config(entry_cfg, cfg.hf_use_auth_token, streaming=False)
        if isinstance(rows, (DatasetDict, IterableDatasetDict)):
            split = entry_cfg.split if entry_cfg.split in rows else "train"
            if split not in rows:
                raise GrapeError(f"{where}: no '{split}' split; name one with split:")
            rows = rows[split]
        ctx = Context(where, list(rows.column_names), gcfg)
        fmt = detect_format(ctx, formats)
        entries.append(Entry(i, entry_cfg, rows, fmt, ctx, offset, row_digest(rows)))
        offset += len(rows)
    return entries


def model_identity(gcfg: GrapeConfig) -> str:
    """Local weights by file sizes and times; a hub model by id and revision."""
    path = Path(str(gcfg.model)).expanduser()
    return files_identity(path) if path.exists() else f"hub:{gcfg.model}@{gcfg.revision or 'main'}"


def selection_key(cfg: Any, gcfg: GrapeConfig, entries: list[Entry]) -> str:
    """Changes whenever the selection could: rows, entry settings, model, ``grape:`` options, tokenisation."""
    payload = {
        "grape_plugin": grape_plugin.__version__,
        "grape": gcfg.model_dump(mode="json", exclude=UNKEYED_OPTIONS),
        "model": model_identity(gcfg),
        "axolotl": {k: cfg.get(k) for k in TOKENIZING_KEYS} if gcfg.template == HOST_TEMPLATE else None,
        "datasets": [{"entry": dict(e.config), "rows": e.digest} for e in entries],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def axolotl_renderer(cfg: Any, groups: list[Group], pooled: Pooled) -> Renderer:
    """``template: train``: each candidate's training row through its entry's Axolotl prompt strategy."""
    from axolotl.loaders import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    strategies = {e.index: entry_strategy(cfg, tokenizer, e.config, e.rows, e.ctx.file) for e in pooled.entries}
    by_text = {(prompt_key(g.prompt), c.response): (g, c) for g in groups for c in g.candidates}

    def row_of(prompt: list[Message], response: str) -> tuple[Any, dict]:
        group, cand = by_text[(prompt_key(prompt), response)]
        entry = pooled.entry(cand.row)
        return strategies[entry.index], entry.training_row(group, cand)

    return train_renderer(row_of)


def run_selection(cfg: Any, gcfg: GrapeConfig, pooled: Pooled) -> Selection:
    """Group across entries, score with the run's base model (freed afterwards) and select."""
    entries = pooled.entries
    drops = Drops()
    columns = list(dict.fromkeys(c for e in entries for c in e.ctx.columns))
    ctx = Context(", ".join(e.ctx.file for e in entries), columns, gcfg)
    groups = group_rows(chain.from_iterable(e.rows for e in entries), pooled, ctx, drops)
    renderer = axolotl_renderer(cfg, groups, pooled) if gcfg.template == HOST_TEMPLATE else None
    return run_groups(groups, gcfg, drops, renderer=renderer, file=ctx.file)


def write_selection(folder: Path, pooled: Pooled, selection: Selection, key: str) -> None:
    """Write the kept rows (one JSONL per entry that kept any) and the reports; the folder appears complete or not at all."""
    from grape_plugin.datafiles import publish_folder
    from grape_plugin.report import summary_text

    def fill(tmp: Path) -> None:
        files: dict[str, str] = {}
        for entry in pooled.entries:
            picks = [(g, entry.local(c)) for g, c in selection.picks() if pooled.entry(c.row) is entry]
            if picks:
                files[str(entry.index)] = name = f"selected_{entry.index}.jsonl"
                entry.fmt.selected(entry.rows, picks, entry.ctx).to_json(str(tmp / name), lines=True, force_ascii=False)
        write_report(selection, tmp)
        manifest = {
            "key": key,
            "files": files,
            "datasets": [{"index": e.index, "path": str(e.config.path), "first_row": e.offset} for e in pooled.entries],
            "summary": summary_text(selection),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    publish_folder(folder, fill)


def init_process_group() -> None:
    """Axolotl calls the hook on every rank before torch.distributed exists; start it the way Axolotl will."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from axolotl.utils.distributed import init_distributed_state

        init_distributed_state()


def repoint(entry_cfg: Any, path: Path) -> Any:
    """The entry with its source replaced by the selected JSONL; type, roles and field mappings stay."""
    from axolotl.utils.dict import DictDefault

    kept = {k: v for k, v in entry_cfg.items() if k not in SOURCE_KEYS}
    return DictDefault({**kept, "path": str(path.resolve()), "ds_type": "json"})


def select_datasets(cfg: Any, prepared_default: str) -> None:
    """Point ``cfg.datasets`` at the GRAPE selection, selecting first unless it is on disk."""
    from grape_plugin.distributed import barrier, on_all_ranks, rank_world

    gcfg = grape_config(cfg)
    check_run(cfg)
    init_process_group()
    entries = load_entries(cfg, gcfg)
    key = selection_key(cfg, gcfg, entries)
    folder = Path(cfg.dataset_prepared_path or prepared_default) / "grape" / key
    if on_all_ranks((folder / MANIFEST).is_file()):
        LOG.info("GRAPE: reusing the selection in %s", folder)
    else:
        LOG.info("GRAPE: selecting with %s (template %s) into %s", gcfg.model, gcfg.template, folder)
        pooled = Pooled(entries)
        selection = run_selection(cfg, gcfg, pooled)
        if not selection.kept:
            from grape_plugin.report import summary_text

            raise GrapeError("grape: nothing was selected\n" + summary_text(selection))
        if rank_world()[0] == 0:
            write_selection(folder, pooled, selection, key)
        barrier()
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    cfg.datasets = [repoint(cfg.datasets[int(i)], folder / name) for i, name in manifest["files"].items()]
    LOG.info("GRAPE selection (%s):\n%s", folder, manifest["summary"])
