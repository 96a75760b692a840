"""The rows of an Axolotl run's ``datasets:`` entries, loaded exactly as Axolotl loads them, and how they read as
GRAPE candidates."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from grape_plugin.config import GrapeConfig
from grape_plugin.datafiles import pick_split
from grape_plugin.errors import GrapeError
from grape_plugin.formats import ADDED_RESPONSE, Context, Format, detect_format
from grape_plugin.records import Candidate, Group

from .compat import load_dataset_with_config

UNSUPPORTED_ENTRY_KEYS = ("shards", "preprocess_shards")


@dataclass(frozen=True)
class Entry:
    """One ``datasets:`` entry: its config, its rows as Axolotl loads them, and how they read as candidates."""

    config: Any
    rows: Any
    format: Format
    context: Context
    digest: str

    def training_rows(self, picks: list[tuple[Group, Candidate]]) -> Any:
        """The rows written, and so trained on, for ``picks``: the entry's own shape; for a list of candidates, the
        kept response in ``output``, where Axolotl's instruction types read it."""
        rows = self.format.selected(self.rows, picks, self.context)
        if ADDED_RESPONSE in rows.column_names:
            rows = rows.remove_columns([c for c in ("output",) if c in rows.column_names])
            rows = rows.rename_column(ADDED_RESPONSE, "output")
        return rows

    def training_row(self, group: Group, cand: Candidate) -> dict:
        return self.training_rows([(group, cand)])[0]


def row_digest(rows: Any) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def load_entries(cfg: Any, gcfg: GrapeConfig, formats: Mapping[str, Format]) -> list[Entry]:
    """Every ``datasets:`` entry's rows, exactly as Axolotl loads them (same features, same None-filling), read with
    the run's ``formats``."""
    entries = []
    for i, entry_cfg in enumerate(cfg.datasets):
        where = f"datasets[{i}] ({entry_cfg.path})"
        for key in UNSUPPORTED_ENTRY_KEYS:
            if entry_cfg.get(key):
                raise GrapeError(f"{where}: {key}: is not supported with grape: (the selection needs whole groups)")
        if isinstance(entry_cfg.name, list):
            raise GrapeError(f"{where}: a list of name: configs is not supported with grape:; use one entry each")
        rows = load_dataset_with_config(entry_cfg, cfg.hf_use_auth_token, streaming=False)
        rows = pick_split(rows, entry_cfg.split, where, option="split:")
        ctx = Context(where, list(rows.column_names), gcfg)
        entries.append(Entry(entry_cfg, rows, detect_format(ctx, formats, rows), ctx, row_digest(rows)))
    return entries


