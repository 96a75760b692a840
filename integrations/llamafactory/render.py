"""``template: train``: a candidate's tokens and scored span are exactly the ids and labels LLaMA-Factory trains on.

Each candidate goes through the run's ``SupervisedDatasetProcessor`` (its template, fixed tokenizer, cutoff,
``mask_history``, ``efficient_eos``, ...). The scored span is the last run of labelled tokens: the final
response with the template's end-of-turn tokens, as LLaMA-Factory labels them. The scoring model is the run's
model, loaded by LLaMA-Factory itself (adapters merged, the run's dtype).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from grape_plugin.candidates import Drops, Message
from grape_plugin.render import Renderer, Rendered, labelled_span

# ModelArguments that change the loaded model (beyond its files); absent ones (other versions) read as None
MODEL_KEYS = (
    "quantization_bit", "quantization_method", "quantization_type", "double_quantization", "rope_scaling",
    "flash_attn", "shift_attn", "mixture_of_depths", "use_unsloth", "upcast_layernorm", "upcast_lmhead_output",
    "resize_vocab", "new_special_tokens", "add_tokens", "add_special_tokens", "train_from_scratch",
)  # fmt: skip


def train_renderer(
    template: Any, tokenizer: Any, processor: Any, data_args: Any, over_length: str, drops: Drops
) -> Renderer:
    """Render like the run's SFT preprocessing.

    A candidate longer than ``cutoff_len`` is rendered whole, so ``max_length`` drops it (``over_length: drop``),
    or, with ``over_length: truncate``, as LLaMA-Factory truncates it (counted as ``truncated``).
    """
    from llamafactory.data.processor import SupervisedDatasetProcessor

    scoring = copy.copy(data_args)
    scoring.train_on_prompt = False  # the labels then mark the responses only
    whole = copy.copy(scoring)
    whole.cutoff_len = sys.maxsize
    cut = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=scoring)
    uncut = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=whole)

    def encode(proc: Any, prompt: list[Message], response: str) -> Rendered:
        a = prompt.aligned  # type: ignore[attr-defined]  # an AlignedPrompt
        ids, labels = proc._encode_data_example(
            a["_prompt"], [{"role": "assistant", "content": response}], a["_system"], a["_tools"],
            a["_images"] or [], a["_videos"] or [], a["_audios"] or [],
        )  # fmt: skip
        return labelled_span(ids, labels)

    def render(prompt: list[Message], response: str) -> Rendered:
        item = encode(uncut, prompt, response)
        if len(item.input_ids) <= data_args.cutoff_len or over_length != "truncate":
            return item
        short = encode(cut, prompt, response)
        response_ids = item.input_ids[item.start : item.end]
        if short.input_ids[short.start : short.end] != response_ids[: short.n_tokens]:
            return item  # the cut lost the final turn: max_length drops the whole item
        drops["truncated"] += 1
        return short

    return render


def model_identity(model_args: Any, finetuning_args: Any, dtype: str) -> str:
    """Changes whenever the scoring model's weights or numerics could: base model, adapters, dtype, loading options."""
    from grape_plugin.models import files_identity

    def one(name: str) -> str:
        path = Path(name).expanduser()
        return files_identity(path) if path.exists() else f"hub:{name}@{model_args.model_revision}"

    adapters = model_args.adapter_name_or_path or []
    options = {k: str(getattr(model_args, k, None)) for k in MODEL_KEYS}
    return "|".join(["llamafactory", one(model_args.model_name_or_path), *map(one, adapters),
                     finetuning_args.finetuning_type, dtype, repr(sorted(options.items()))])  # fmt: skip


def load_scorer(tokenizer: Any, model_args: Any, finetuning_args: Any, batch_tokens: int) -> Any:
    """The run's model, loaded by LLaMA-Factory for inference, as a GRAPE scorer (``close()`` frees it)."""
    from llamafactory.model import load_model

    from grape_plugin.models import LoadedModel
    from grape_plugin.scoring import TransformersScorer

    model = load_model(tokenizer, copy.deepcopy(model_args), finetuning_args, is_trainable=False)  # eval, no grads
    identity = model_identity(model_args, finetuning_args, str(model.dtype))
    return TransformersScorer(LoadedModel(model, tokenizer, identity, model_args.model_name_or_path), batch_tokens)
