"""Axolotl as a GRAPE host: the run's ``datasets:`` in, the selection's JSONL files out, ``cfg.datasets`` repointed.

Every entry is read as Axolotl reads it and grouped across entries (pooled data often comes as one file per
generator). The scoring model is the run's own: Axolotl's tokenizer and ``ModelLoader`` (its quantization,
adapters and attention settings). The kept rows are written, in each entry's own shape, to
``{dataset_prepared_path}/grape/{key}/`` with the reports, and Axolotl then tokenises and caches them as usual.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from grape_plugin.components import Components
from grape_plugin.config import GrapeConfig
from grape_plugin.errors import GrapeError
from grape_plugin.formats import Input, group_rows
from grape_plugin.host import BaseHost, prepare
from grape_plugin.records import Grouped, Selection
from grape_plugin.render import Renderer
from grape_plugin.scoring import Scorer

from .args import HINTS
from .compat import DictDefault, ModelLoader, init_distributed_state, load_tokenizer, scoring_cfg
from .entries import load_entries
from .render import train_renderer

# Axolotl's logging config shows INFO only for loggers named axolotl.*
LOG = logging.getLogger("axolotl.integrations.grape_plugin")

DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
# Axolotl settings that shape the tokens and labels a candidate is scored on
TOKENIZING_KEYS = (
    "tokenizer_config", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy", "chat_template",
    "chat_template_jinja", "default_system_message", "special_tokens", "tokens", "added_tokens_overrides",
    "sequence_len", "train_on_inputs", "excess_length_strategy",
)  # fmt: skip
# Axolotl settings that change the scoring model beyond its files
MODEL_KEYS = (
    "torch_dtype", "adapter", "load_in_8bit", "load_in_4bit", "gptq", "bnb_config_kwargs", "flash_attention",
    "sdp_attention", "xformers_attention", "eager_attention", "attn_implementation", "overrides_of_model_config",
    "overrides_of_model_kwargs", "model_config_type", "type_of_model",
)  # fmt: skip
# entry keys that say where the original rows come from; the rewritten entry points at the selection instead
SOURCE_KEYS = ("path", "ds_type", "data_files", "split", "name", "revision", "weight")


def grape_config(cfg: Any) -> GrapeConfig:
    """The ``grape:`` block over the run's defaults (``template: train``, ``max_length: sequence_len``)."""
    truncate = str(cfg.excess_length_strategy or "drop").lower() == "truncate"
    defaults = {
        "model": str(cfg.base_model),
        "max_length": cfg.sequence_len,
        "over_length": "truncate" if truncate else "drop",
        "dtype": DTYPES.get(str(cfg.torch_dtype), "auto"),
    }
    return BaseHost.options(cfg.grape, defaults, "grape", HINTS)


class AxolotlHost(BaseHost):
    """The GRAPE host contract for one Axolotl run (see ``grape_plugin.host``)."""

    def __init__(self, run: Any, cfg: GrapeConfig, prepared_default: str):
        super().__init__(Components.of(cfg, host_template=True))
        self.run, self.prepared_default = run, prepared_default
        self.entries = load_entries(run, cfg, self.parts.formats)
        self.where = ", ".join(e.context.file for e in self.entries)

    def scorer(self) -> Scorer:
        run, tokenizer = self.run, load_tokenizer(self.run)
        weights = [(str(run.base_model), run.revision_of_model)]
        if run.lora_model_dir:
            weights.append((str(run.lora_model_dir), None))

        def load() -> Any:
            model, _ = ModelLoader(scoring_cfg(run), tokenizer, inference=True).load()
            return model.eval().requires_grad_(False)

        return self.model_scorer("axolotl", tokenizer, weights, {k: run.get(k) for k in MODEL_KEYS}, load)

    def key_parts(self) -> Mapping[str, Any]:
        return {
            "axolotl": {k: self.run.get(k) for k in TOKENIZING_KEYS},
            "datasets": [{"entry": dict(e.config), "rows": e.digest} for e in self.entries],
        }

    def read(self) -> Grouped:
        inputs = [Input(e.rows, e.format, e.context) for e in self.entries]
        return group_rows(inputs, self.cfg.min_candidates)

    def train_renderer(self, scorer: Scorer) -> Renderer:
        """``template: train``: each candidate's training row through its entry's Axolotl prompt strategy."""
        return train_renderer(self.run, scorer.tokenizer, self.entries)

    def folder(self, key: str) -> Path:
        return Path(self.run.dataset_prepared_path or self.prepared_default) / "grape" / key

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        """One ``selected_<entry>.jsonl`` per entry that kept any row."""
        picked, paths = list(selection.picks_in_order(texts=True)), {}
        for part, entry in enumerate(self.entries):
            picks = [(g, c) for g, c in picked if c.part == part]
            if picks:
                paths[f"selected_{part}"] = folder / f"selected_{part}.jsonl"
                entry.training_rows(picks).to_json(str(paths[f"selected_{part}"]), lines=True, force_ascii=False)
        return paths


def check_run(cfg: Any) -> None:
    """Refuse what GRAPE cannot select for, rather than silently training on unselected data."""
    if cfg.rl:
        raise GrapeError(f"grape: selects SFT data; this run has rl: {cfg.rl} (remove the grape: block)")
    if cfg.pretraining_dataset:
        raise GrapeError("grape: selects SFT datasets:, not a pretraining_dataset (remove the grape: block)")
    if not cfg.datasets:
        raise GrapeError("grape: the config has no datasets: to select from")


def init_process_group() -> None:
    """Axolotl calls the hook on every rank before torch.distributed exists; start it the way Axolotl will."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        init_distributed_state()


def repoint(entry_cfg: Any, path: Path) -> Any:
    """The entry with its source replaced by the selected JSONL; type, roles and field mappings stay."""
    kept = {k: v for k, v in entry_cfg.items() if k not in SOURCE_KEYS}
    return DictDefault({**kept, "path": str(path.resolve()), "ds_type": "json"})


def select_datasets(cfg: Any, prepared_default: str) -> None:
    """Point ``cfg.datasets`` at the GRAPE selection, selecting first unless it is on disk."""
    gcfg = grape_config(cfg)
    check_run(cfg)
    init_process_group()
    prepared = prepare(AxolotlHost(cfg, gcfg, prepared_default))
    LOG.info("GRAPE: %s %s", "reusing the selection in" if prepared.reused else "selection written to", prepared.folder)
    files = [(i, prepared.folder / f"selected_{i}.jsonl") for i in range(len(cfg.datasets))]
    cfg.datasets = [repoint(cfg.datasets[i], path) for i, path in files if path.is_file()]
    LOG.info("GRAPE selection (%s):\n%s", prepared.folder, prepared.manifest["summary"])
