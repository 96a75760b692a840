"""The host contract: what Axolotl, LLaMA-Factory (or any trainer) supplies, and the one core function that does
the rest.

A host says where the groups come from, how a candidate is rendered, how the scoring model loads (the way the host
loads the model it trains), what else the selection depends on, and where and in what shape the selection is
written. ``prepare`` owns everything else: the selection key, reusing a selection already on disk, loading the
weights only when something is left to score, the score cache, sharding over ranks, publishing the folder whole and
the barrier after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from .config import GrapeConfig
from .errors import GrapeError
from .pipeline import run_groups, write_report
from .records import Grouped, Selection
from .render import Renderer
from .scoring import Scorer
from .version import __version__

log = logging.getLogger(__name__)

MANIFEST = "selection.json"  # written last: a folder with it holds a whole selection
LAYOUT = 2  # bump when what a selection folder holds changes
UNKEYED_OPTIONS = {"cache_dir", "batch_tokens", "device", "keep_token_scores"}  # where, how fast, what is cached


class Host(Protocol):
    """What a host supplies to ``prepare``. ``where`` names the host's input in messages."""

    where: str

    def scorer(self) -> Scorer:
        """The scoring model as the host loads its training model: tokenizer and identity now, weights on first use."""

    def key_parts(self) -> Mapping[str, Any]:
        """What the selection depends on besides the options and the model: the data, the host's token settings."""

    def read(self) -> Grouped:
        """The candidates, grouped through the core's formats."""

    def renderer(self, scorer: Scorer) -> Renderer:
        """How a candidate becomes token ids and a response span (``template: train``: the host's own labels)."""

    def folder(self, key: str) -> Path:
        """Where the selection with this key lives."""

    def write(self, selection: Selection, folder: Path) -> None:
        """The kept rows in the host's own shape, into ``folder`` (a staging folder, renamed when complete)."""

    def is_writer(self) -> bool:
        """Whether this process publishes the folder (one per file system)."""

    def finish(self, selection: Selection) -> Selection:
        """The host's last word on a selection before it is written (its own caps); by default none."""
        return selection


@dataclass(frozen=True)
class Prepared:
    """A selection folder on disk, whether it was reused, and its manifest (key, summary, report and what the key
    covers)."""

    folder: Path
    reused: bool
    manifest: Mapping[str, Any]


def key_inputs(cfg: GrapeConfig, identity: str, parts: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the selection depends on: options, model identity, the host's data and settings."""
    payload = {
        "layout": LAYOUT,
        "grape_plugin": __version__,
        "options": cfg.model_dump(mode="json", exclude=UNKEYED_OPTIONS),
        "model": identity,
        "host": parts,
    }
    return json.loads(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str))


def selection_key(inputs: Mapping[str, Any]) -> str:
    """A short hash of ``key_inputs``: it changes whenever the selection could."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def prepare(host: Host, cfg: GrapeConfig) -> Prepared:
    """On every rank: make sure the host's selection exists, selecting it together if it does not."""
    from .datafiles import publish_folder
    from .distributed import barrier, on_all_ranks
    from .report import summary, summary_text

    scorer = host.scorer()
    inputs = key_inputs(cfg, scorer.identity, host.key_parts())
    key = selection_key(inputs)
    folder = host.folder(key)
    manifest = folder / MANIFEST
    if on_all_ranks(manifest.is_file()):
        log.info("GRAPE: reusing the selection in %s", folder)
        return Prepared(folder, True, json.loads(manifest.read_text(encoding="utf-8")))
    log.info("GRAPE: selecting with %s (template %s) into %s", scorer.identity, cfg.template, folder)
    try:
        selection = run_groups(host.read(), cfg, scorer=scorer, renderer=host.renderer(scorer), file=host.where)
        selection = host.finish(selection)
    finally:
        scorer.close()  # before the host loads the model it trains
    if not selection.kept:
        raise GrapeError(f"{host.where}: nothing was selected\n{summary_text(selection)}")
    info = {"key": key, "summary": summary_text(selection), "report": summary(selection), "inputs": inputs}

    def fill(staging: Path) -> None:
        host.write(selection, staging)
        write_report(selection, staging)
        (staging / MANIFEST).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if host.is_writer():
        publish_folder(folder, fill)
    barrier()
    return Prepared(folder, False, info)
