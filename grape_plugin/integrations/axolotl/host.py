"""Axolotl as a GRAPE host: the run's ``datasets:`` in, the selection's JSONL files out, ``cfg.datasets`` repointed.

Every entry is read exactly as Axolotl reads it and grouped across entries (pooled data often comes as one file per
generator). The scoring model is the run's own: Axolotl's tokenizer and ``ModelLoader`` (its quantization, adapters
and attention settings). ``template: train`` tokenises each candidate with the very prompt strategy Axolotl builds
for its entry (alpaca, chat_template, ...), so the scored span is exactly the span Axolotl puts in the labels (for
chat templates that includes the end-of-turn token). The kept rows are written, in each entry's own shape, to
``{dataset_prepared_path}/grape/{key}/`` with the reports, and Axolotl then tokenises and caches them as usual.
"""

import logging
import os
from pathlib import Path
from typing import Any

from grape_plugin.host import (
    ADDED_RESPONSE, BaseHost, Candidate, Components, Context, GrapeError, Group, Input, Rendered, Renderer, Scorer,
    detect_format, labelled_span, pick_split, prepare,
)  # fmt: skip

from . import compat
from .args import HINTS

LOG = logging.getLogger("axolotl.integrations.grape_plugin")  # Axolotl shows INFO only for loggers named axolotl.*
DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
# Axolotl settings that shape the tokens and labels a candidate is scored on
TOKENIZING_KEYS = ("tokenizer_config", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy", "chat_template",
                   "chat_template_jinja", "default_system_message", "special_tokens", "tokens",
                   "added_tokens_overrides", "sequence_len", "train_on_inputs", "excess_length_strategy")  # fmt: skip
# Axolotl settings that change the scoring model beyond its files
MODEL_KEYS = ("torch_dtype", "adapter", "load_in_8bit", "load_in_4bit", "gptq", "bnb_config_kwargs", "flash_attention",
              "sdp_attention", "xformers_attention", "eager_attention", "attn_implementation", "model_config_type",
              "overrides_of_model_config", "overrides_of_model_kwargs", "type_of_model")  # fmt: skip
# entry keys that say where the original rows come from; the rewritten entry points at the selection instead
SOURCE_KEYS = ("path", "ds_type", "data_files", "split", "name", "revision", "weight")


def select_datasets(cfg: Any) -> None:
    """Point ``cfg.datasets`` at the GRAPE selection, selecting first unless it is on disk; an entry that kept no
    row is left out."""
    try:
        prepared = prepare(host := AxolotlHost(cfg))
    except GrapeError as exc:
        LOG.error("%s", exc)
        raise SystemExit(f"grape-plugin: {exc}") from None
    cfg.datasets = [repoint(entry, path) for entry, path in zip(cfg.datasets, host.kept_parts(prepared.folder)) if path]


def repoint(entry: Any, path: Path) -> Any:
    """The entry with its source replaced by the selected JSONL; type, roles and field mappings stay."""
    kept = {k: v for k, v in entry.items() if k not in SOURCE_KEYS}
    return compat.DictDefault({**kept, "path": str(path.resolve()), "ds_type": "json"})


def load_input(run: Any, parts: Components, i: int, entry: Any) -> Input:
    """One ``datasets:`` entry's rows exactly as Axolotl loads them (same features, same None-filling), read with the
    run's formats."""
    where = f"datasets[{i}] ({entry.path})"
    for key in ("shards", "preprocess_shards"):
        if entry.get(key):
            raise GrapeError(f"{where}: {key}: is not supported with grape: (the selection needs whole groups)")
    if isinstance(entry.name, list):
        raise GrapeError(f"{where}: a list of name: configs is not supported with grape:; use one entry each")
    rows = compat.load_dataset_with_config(entry, run.hf_use_auth_token, streaming=False)
    rows = pick_split(rows, entry.split, where, option="split:")
    ctx = Context(where, list(rows.column_names), parts.cfg)
    return Input(rows, detect_format(ctx, parts.formats, rows), ctx)


class AxolotlHost(BaseHost):
    """The GRAPE host contract for one Axolotl run (see ``grape_plugin.host``)."""

    log = LOG

    def __init__(self, run: Any):
        """The ``grape:`` block over the run's defaults, and every entry's rows; a run GRAPE cannot select for is
        refused, rather than silently trained on unselected data."""
        if run.rl:
            raise GrapeError(f"grape: selects SFT data; this run has rl: {run.rl} (remove the grape: block)")
        if run.pretraining_dataset:
            raise GrapeError("grape: selects SFT datasets:, not a pretraining_dataset (remove the grape: block)")
        defaults = {"model": str(run.base_model), "max_length": run.sequence_len,
                    "over_length": "truncate" if run.excess_length_strategy == "truncate" else "drop",
                    "dtype": DTYPES.get(str(run.torch_dtype), "auto")}  # fmt: skip
        cfg = BaseHost.options(run.grape, defaults, "grape", HINTS, ("sequence_len", run.sequence_len))
        super().__init__(Components.of(cfg, host_template=True))
        # Axolotl calls the hook on every rank before torch.distributed exists: start it the way Axolotl will
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            compat.init_distributed_state()
        self.run, self.inputs = run, [load_input(run, self.parts, i, entry) for i, entry in enumerate(run.datasets)]
        self.where = ", ".join(i.context.file for i in self.inputs)

    def scorer(self) -> Scorer:
        run, tokenizer = self.run, compat.load_tokenizer(self.run)
        weights = [(str(run.base_model), run.revision_of_model), *((str(d), None) for d in [run.lora_model_dir] if d)]
        settings = {k: run.get(k) for k in MODEL_KEYS}
        return self.model_scorer("axolotl", tokenizer, weights, settings, lambda: compat.load_model(run, tokenizer))

    def key_parts(self) -> dict[str, Any]:
        axolotl = {k: self.run.get(k) for k in TOKENIZING_KEYS}
        return {**super().key_parts(), "axolotl": axolotl, "datasets": [dict(e) for e in self.run.datasets]}

    def train_renderer(self, scorer: Scorer) -> Renderer:
        """``template: train``: each candidate's training row through its entry's prompt strategy."""
        strategies = [self.strategy(scorer.tokenizer, e, i) for e, i in zip(self.run.datasets, self.inputs)]

        def render(group: Group, cand: Candidate) -> Rendered:
            tokens = strategies[cand.part].tokenize_prompt(self.part_rows(cand.part, [(group, cand)])[0])
            return labelled_span(tokens["input_ids"], tokens["labels"])

        return render

    def strategy(self, tokenizer: Any, entry: Any, inp: Input) -> Any:
        """The prompt-tokenising strategy Axolotl builds for an entry, with the prompt unlabelled: with
        ``train_on_inputs`` Axolotl labels the prompt too, and the scored span is the response."""
        base, _, style = entry.type.partition(":") if isinstance(entry.type, str) else (None, "", "")
        wrapped, _ = compat.get_dataset_wrapper(entry, tokenizer, self.run, base, inp.rows.select([0]), style or None)
        strategy = getattr(wrapped, "prompt_tokenizer", None)  # set by TokenizedPromptDataset, the per-row wrapper
        if strategy is None:
            raise GrapeError(f"{inp.context.file} (type {entry.type!r}): Axolotl tokenises it without a per-row "
                             "strategy (already tokenised, skip_prepare_dataset or a dataset-level type); set grape: "
                             "template: paper or chat")  # fmt: skip
        strategy.train_on_inputs = False  # ours alone: built here, on the entry's first row
        return strategy

    def part_rows(self, part: int, picks: list[tuple[Group, Candidate]]) -> Any:
        """The rows written, and so trained on: the entry's own shape; for a list of candidates, the kept response in
        ``output``, where Axolotl's instruction types read it."""
        rows = super().part_rows(part, picks)
        if ADDED_RESPONSE not in rows.column_names:
            return rows
        return rows.remove_columns(list({"output"} & set(rows.column_names))).rename_column(ADDED_RESPONSE, "output")

    def folder(self, key: str) -> Path:
        return Path(self.run.dataset_prepared_path or compat.DEFAULT_DATASET_PREPARED_PATH) / "grape" / key
