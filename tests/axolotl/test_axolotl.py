"""The real Axolotl 0.19.0 end to end on CPU: `axolotl preprocess` / `axolotl train` with the GRAPE plugin.

The prepared dataset's labels must hold exactly the responses that scoring here, independently of the plugin
(Axolotl's prompt text, tokenised like Axolotl, unbatched forward pass), picks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.helpers import build_tiny_smollm2, pool_rows, write_jsonl

pytestmark = pytest.mark.axolotl

BIN = Path(sys.executable).parent
SEQUENCE_LEN = 1024
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
BASE_CFG = {
    "base_model": "./tiny",
    "tokenizer_type": "AutoTokenizer",
    "sequence_len": SEQUENCE_LEN,
    "val_set_size": 0,
    "output_dir": "./out",
    "sample_packing": False,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 1,
    "learning_rate": 1.0e-4,
    "optimizer": "adamw_torch",
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "flash_attention": False,
    "sdp_attention": False,
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "dataset_num_proc": 1,
    "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "plugins": ["grape_plugin.integrations.axolotl.GrapePlugin"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Model + pooled data: 4 instructions x 8 generators, as one alpaca file per 4 generators, and as chat rows
    with per-row ids."""
    work = tmp_path_factory.mktemp("axolotl")
    build_tiny_smollm2(work / "tiny")
    rows = pool_rows(4)
    generators = list(dict.fromkeys(r["generator"] for r in rows))
    alpaca = [{k: r[k] for k in ("instruction", "output", "generator")} for r in rows]  # no id: grouped by prompt
    write_jsonl(work / "gen_a.jsonl", [r for r in alpaca if r["generator"] in generators[:4]])
    write_jsonl(work / "gen_b.jsonl", [r for r in alpaca if r["generator"] in generators[4:]])
    chat = [  # Tulu-3 style: every row its own id, so rows group by prompt
        {"id": f"ai2-adapt-dev/pool_{n}", "source": r["generator"], "messages": [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for n, r in enumerate(rows)
    ]  # fmt: skip
    write_jsonl(work / "chat.jsonl", chat)
    return work


def write_cfg(work: Path, name: str, **overrides) -> Path:
    cfg = {**BASE_CFG, **overrides}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = work / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def alpaca_cfg(work: Path, name: str, prepared: str, grape: dict | None) -> Path:
    datasets = [{"path": f"./{f}", "ds_type": "json", "type": "alpaca"} for f in ("gen_a.jsonl", "gen_b.jsonl")]
    return write_cfg(work, name, datasets=datasets, dataset_prepared_path=prepared, grape=grape)


def axolotl(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "GRAPE_CACHE_DIR": str(work / "scores")}
    proc = subprocess.run([str(BIN / "axolotl"), *args], cwd=work, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"axolotl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def prepared_folders(work: Path, prepared: str) -> list[Path]:
    """The datasets Axolotl saved under ``dataset_prepared_path``."""
    return [p for p in (work / prepared).iterdir() if (p / "dataset_info.json").is_file()]


def prepared_rows(work: Path, prepared: str) -> list[tuple[str, str]]:
    """(prompt, labelled text) of every row of the one dataset Axolotl prepared."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    folders = prepared_folders(work, prepared)
    assert len(folders) == 1, folders
    tok = AutoTokenizer.from_pretrained(work / "tiny")
    out = []
    for r in load_from_disk(folders[0]):
        first = next(i for i, label in enumerate(r["labels"]) if label != -100)
        labelled = [t for t, label in zip(r["input_ids"], r["labels"]) if label != -100]
        out.append((tok.decode(r["input_ids"][:first]), tok.decode(labelled)))
    return out


def mean_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, len(prompt_ids):]
    return logp[len(prompt_ids) - 1:].gather(1, targets[:, None]).mean().item()


def direct_picks(work: Path, encode, top_k: int = 1) -> dict[str, list[str]]:
    """Per instruction, the top_k responses by mean log-prob; ``encode(row) -> (prompt ids, labelled ids)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tiny")
    model = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    scored: dict[str, dict[str, float]] = {}
    for r in pool_rows(4):
        prompt_ids, response_ids = encode(tok, r)
        if len(prompt_ids) + len(response_ids) <= SEQUENCE_LEN:  # Axolotl drops longer rows
            scored.setdefault(r["instruction"], {})[r["output"]] = mean_logprob(model, prompt_ids, response_ids)
    return {k: sorted(v, key=v.get, reverse=True)[:top_k] for k, v in scored.items()}


def alpaca_encode(tok, row: dict) -> tuple[list[int], list[int]]:
    prompt = tok(ALPACA_PROMPT.format(instruction=row["instruction"]))["input_ids"]
    return prompt, tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def chat_encode(tok, row: dict) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": row["instruction"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row["output"]}], tokenize=False)
    assert full.startswith(prompt)
    ids = tok(full)["input_ids"]
    start = len(tok(prompt)["input_ids"])
    end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), start) + 1  # the assistant turn and its end token
    return ids[:start], ids[start:end]


def expected_rows(tok_free_picks: dict[str, list[str]], prompt_of) -> list[tuple[str, str]]:
    return sorted((prompt_of(instr), resp) for instr, resps in tok_free_picks.items() for resp in resps)


def selection_folders(work: Path, prepared: str) -> list[Path]:
    return sorted((work / prepared / "grape").glob("*/"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def alpaca_run(work: Path) -> Path:
    """`axolotl preprocess` with the plugin on two alpaca files (one per 4 generators)."""
    before = {f: digest(work / f) for f in ("gen_a.jsonl", "gen_b.jsonl")}
    axolotl(work, "preprocess", str(alpaca_cfg(work, "alpaca.yml", "prepared", {"top_k": 1})))
    assert {f: digest(work / f) for f in before} == before, "the user's files were modified"
    return work


def test_preprocess_trains_on_exactly_the_directly_scored_picks(alpaca_run: Path) -> None:
    picks = direct_picks(alpaca_run, alpaca_encode)
    assert len(picks) == 4
    got = sorted(prepared_rows(alpaca_run, "prepared"))
    want = expected_rows(picks, lambda i: ALPACA_PROMPT.format(instruction=i))
    assert got == [(p, r + "<|im_end|>") for p, r in want]
    (folder,) = selection_folders(alpaca_run, "prepared")
    report = json.loads((folder / "report.json").read_text())
    assert report["candidates_kept"] == 4 and report["instructions_kept"] == 4
    assert report["dropped"]["candidates"]["too_long"] == 3  # 3 answers exceed sequence_len: never picked silently
    assert report["model_loaded"] is True
    assert sum(report["wins_per_source"].values()) == 4
    scores = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    assert sum(s["selected"] for s in scores) == 4


def test_train_reuses_the_selection_and_trains(alpaca_run: Path) -> None:
    proc = axolotl(alpaca_run, "train", "alpaca.yml", "--launcher", "python")
    log = proc.stdout + proc.stderr
    assert "GRAPE selection reused from" in log
    assert "Loading prepared dataset from disk" in log  # Axolotl's own cache of the same selected file
    assert "train_loss" in log
    assert len(selection_folders(alpaca_run, "prepared")) == 1


def test_changed_block_reselects_from_cached_scores(alpaca_run: Path) -> None:
    block = {"top_k": 2, "metric": "min_k"}  # another fit metric too: from the cached per-token values
    axolotl(alpaca_run, "preprocess", str(alpaca_cfg(alpaca_run, "alpaca_top2.yml", "prepared", block)))
    folders = selection_folders(alpaca_run, "prepared")
    assert len(folders) == 2
    report = json.loads((max(folders, key=os.path.getmtime) / "report.json").read_text())
    assert report["scored"] == 0 and report["model_loaded"] is False  # every score came from the cache
    folders = prepared_folders(alpaca_run, "prepared")
    assert len(folders) == 2  # a new selected file, so Axolotl prepared it afresh
    newest = max(folders, key=os.path.getmtime)
    from datasets import load_from_disk

    assert len(load_from_disk(newest)) == 8


def test_two_ranks_select_what_one_rank_selects(alpaca_run: Path) -> None:
    # a new prepared folder and no score cache: the two ranks really score, each its share
    cfg = alpaca_cfg(alpaca_run, "alpaca_ddp.yml", "prepared_ddp", {"top_k": 1, "cache_dir": None})
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    probe = Path(__file__).with_name("rank_probe.py")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", str(probe), str(cfg)]
    proc = subprocess.run(cmd, cwd=alpaca_run, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads(line.split("RANK_RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RANK_RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    assert results[0]["datasets"] == results[1]["datasets"]
    (two_ranks,) = selection_folders(alpaca_run, "prepared_ddp")
    one_rank = alpaca_run / "prepared" / "grape" / two_ranks.name  # same key: same data, model and block
    assert one_rank.is_dir()
    for name in ("selected_0.jsonl", "selected_1.jsonl"):
        assert (two_ranks / name).read_text() == (one_rank / name).read_text()


def test_chat_template_scores_the_labelled_assistant_turn(work: Path) -> None:
    datasets = [{"path": "./chat.jsonl", "ds_type": "json", "type": "chat_template", "field_messages": "messages"}]
    cfg = write_cfg(work, "chat.yml", datasets=datasets, chat_template="tokenizer_default",
                    dataset_prepared_path="prepared_chat", grape={"top_k": 1})  # fmt: skip
    axolotl(work, "preprocess", str(cfg))
    picks = direct_picks(work, chat_encode)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tiny")

    def prompt_of(instruction: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False)

    assert sorted(prepared_rows(work, "prepared_chat")) == [(p, r + "<|im_end|>") for p, r in expected_rows(picks, prompt_of)]


def test_without_a_grape_block_the_plugin_does_nothing(work: Path) -> None:
    axolotl(work, "preprocess", str(alpaca_cfg(work, "plain.yml", "prepared_plain", None)))
    assert not (work / "prepared_plain" / "grape").exists()
    assert len(prepared_rows(work, "prepared_plain")) == 29  # every row that fits sequence_len


def test_an_entry_none_of_whose_candidates_won_is_left_out_with_a_warning(work: Path) -> None:
    write_jsonl(work / "long.jsonl", [{"instruction": "Repeat one word.", "output": "word " * (2 * SEQUENCE_LEN)}])
    datasets = [{"path": f"./{f}", "ds_type": "json", "type": "alpaca"} for f in ("gen_a.jsonl", "long.jsonl")]
    cfg = write_cfg(work, "left.yml", datasets=datasets, dataset_prepared_path="left", grape={})
    proc = axolotl(work, "preprocess", str(cfg))
    (folder,) = selection_folders(work, "left")
    assert sorted(p.name for p in folder.glob("selected_*")) == ["selected_0.jsonl"]
    log = proc.stdout + proc.stderr
    assert "datasets[1] (./long.jsonl): no candidate of it was selected; it is left out of the run" in log
    assert len(prepared_rows(work, "left")) == 4  # the one kept entry: one response per instruction


@pytest.mark.parametrize(
    "block, expected",
    [
        ({"top_kk": 2}, ["unknown key 'top_kk'", "expected one of", "top_k"]),
        ({"template": "trian"}, ["template 'trian' is not one of", "train"]),
        ({"max_length": 4096}, [f"max_length 4096 exceeds the run's sequence_len {SEQUENCE_LEN}"]),
    ],
)
def test_bad_grape_options_fail_with_a_clear_message(work: Path, block: dict, expected: list[str]) -> None:
    proc = axolotl(work, "preprocess", str(alpaca_cfg(work, "bad.yml", "prepared_bad", block)), check=False)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stdout + proc.stderr
    assert not (work / "prepared_bad").exists()


def test_the_runs_adapter_scores(work: Path) -> None:
    """``adapter: lora`` with ``lora_model_dir``: the model Axolotl trains is base + adapter, and so is the scorer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(work / "adapter")
    merged = lora.merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    cfg = alpaca_cfg(work, "lora.yml", "prepared_lora", {"top_k": 1, "cache_dir": None})
    data = yaml.safe_load(cfg.read_text())
    data.update(adapter="lora", lora_model_dir="./adapter", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    axolotl(work, "preprocess", str(cfg))
    (folder,) = selection_folders(work, "prepared_lora")
    scores = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    first = [s for s in scores if s["group"] == scores[0]["group"]]
    tok = AutoTokenizer.from_pretrained(work / "tiny")
    rows = {r["generator"]: r for r in pool_rows(1)}
    assert len(first) >= 5
    for s in first:
        prompt_ids, response_ids = alpaca_encode(tok, rows[s["source"]])
        want = mean_logprob(merged, prompt_ids, response_ids)
        assert abs(s["score"] - want) < 1e-4
        assert abs(mean_logprob(base, prompt_ids, response_ids) - want) > 1e-3  # the adapter really matters
