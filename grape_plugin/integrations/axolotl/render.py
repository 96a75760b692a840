"""``template: train``: each candidate tokenised by the very prompt strategy Axolotl will train with.

Axolotl builds one prompt-tokenising strategy per ``datasets:`` entry (alpaca, chat_template, ...); it is taken
from Axolotl itself and applied to the row that will be written for the candidate, so the scored span is
exactly the span Axolotl puts in the labels (for chat templates that includes the end-of-turn token).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from grape_plugin.errors import GrapeError
from grape_plugin.records import Candidate, Group
from grape_plugin.render import Rendered, Renderer, labelled_span

from .compat import TokenizedPromptDataset, get_dataset_wrapper
from .entries import Entry


def entry_strategy(cfg: Any, tokenizer: Any, entry: Entry) -> Any:
    """The prompt-tokenising strategy Axolotl builds for one ``datasets:`` entry, with prompt labels off."""
    entry_cfg = entry.config
    base, _, style = str(entry_cfg.type).partition(":") if isinstance(entry_cfg.type, str) else (None, "", "")
    wrapped, _ = get_dataset_wrapper(
        dataset_config=entry_cfg,
        tokenizer=tokenizer,
        cfg=cfg,
        dataset_base_type=base,
        dataset=entry.rows.select(range(1)),
        dataset_prompt_style=style or None,
    )
    strategy = getattr(wrapped, "prompt_tokenizer", None)
    if not isinstance(wrapped, TokenizedPromptDataset) or strategy is None:
        raise GrapeError(
            f"{entry.context.file} (type {entry_cfg.type!r}): Axolotl tokenises it without a per-row strategy "
            "(already tokenised, skip_prepare_dataset or a dataset-level type); set grape: template: paper or chat"
        )
    if getattr(strategy, "train_on_inputs", False):
        # train_on_inputs labels the prompt too; the response is what Axolotl labels without it
        strategy = copy.copy(strategy)
        strategy.train_on_inputs = False
    return strategy


def train_renderer(cfg: Any, tokenizer: Any, entries: Sequence[Entry]) -> Renderer:
    """Render a candidate as its entry's strategy tokenises the row written for it."""
    strategies = [entry_strategy(cfg, tokenizer, e) for e in entries]

    def render(group: Group, cand: Candidate) -> Rendered:
        tokens = strategies[cand.part].tokenize_prompt(entries[cand.part].training_row(group, cand))
        return labelled_span(tokens["input_ids"], tokens["labels"])

    return render
