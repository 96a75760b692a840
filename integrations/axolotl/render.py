"""``template: train``: each candidate tokenised by the very prompt strategy Axolotl will train with.

Axolotl builds one prompt-tokenising strategy per ``datasets:`` entry (alpaca, chat_template, ...); it is taken
from Axolotl itself and applied to the row that will be written for the candidate, so the scored span is
exactly the span Axolotl puts in the labels (for chat templates that includes the end-of-turn token).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from grape_plugin.candidates import Message
from grape_plugin.errors import GrapeError
from grape_plugin.render import Rendered, Renderer

IGNORE = -100


def labelled_span(labels: list[int]) -> tuple[int, int]:
    """The last contiguous run of labelled positions, as ``[start, end)``."""
    end = next((p + 1 for p in range(len(labels) - 1, -1, -1) if labels[p] != IGNORE), None)
    if end is None:
        raise GrapeError("Axolotl labels no token of this row (nothing would be trained on)")
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if start == 0:
        raise GrapeError("Axolotl labels the whole row, prompt included; no response span to score")
    return start, end


def entry_strategy(cfg: Any, tokenizer: Any, entry_cfg: Any, rows: Any, where: str) -> Any:
    """The prompt-tokenising strategy Axolotl builds for one ``datasets:`` entry, with prompt labels off."""
    from axolotl.datasets import TokenizedPromptDataset
    from axolotl.utils.data.wrappers import get_dataset_wrapper

    base, _, style = str(entry_cfg.type).partition(":") if isinstance(entry_cfg.type, str) else (None, "", "")
    wrapped, _ = get_dataset_wrapper(
        dataset_config=entry_cfg,
        tokenizer=tokenizer,
        cfg=cfg,
        dataset_base_type=base,
        dataset=rows.select(range(1)),
        dataset_prompt_style=style or None,
    )
    strategy = getattr(wrapped, "prompt_tokenizer", None)
    if not isinstance(wrapped, TokenizedPromptDataset) or strategy is None:
        raise GrapeError(
            f"{where} (type {entry_cfg.type!r}): Axolotl tokenises it without a per-row strategy (already "
            "tokenised, skip_prepare_dataset or a dataset-level type); set grape: template: paper or chat"
        )
    if getattr(strategy, "train_on_inputs", False):
        # train_on_inputs labels the prompt too; the response is what Axolotl labels without it
        strategy = copy.copy(strategy)
        strategy.train_on_inputs = False
    return strategy


def train_renderer(row_of: Callable[[list[Message], str], tuple[Any, dict]]) -> Renderer:
    """A renderer over ``row_of(prompt, response) -> (strategy, training row)``."""

    def render(prompt: list[Message], response: str) -> Rendered:
        strategy, row = row_of(prompt, response)
        tokens = strategy.tokenize_prompt(row)
        start, end = labelled_span(list(tokens["labels"]))
        return Rendered(tuple(tokens["input_ids"]), start, end)

    return render
