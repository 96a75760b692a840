"""The real LLaMA-Factory 0.9.5 end to end on CPU: `grape-plugin llamafactory train|select`, `grape` dataset option.

The tokenized dataset LLaMA-Factory saves must label exactly the responses that scoring here picks, independently
of the plugin (chatml by hand, tokenised like LLaMA-Factory, one unbatched forward pass per candidate). The data
is real: pooled AlpacaEval answers of 8 generators, LLaMA-Factory's own DPO demo as a ranking set, and untouched
alpaca demo rows.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import LLAMAFACTORY_DATA, build_tiny_smollm2, pool_rows

from grape_plugin.cli import main

pytestmark = pytest.mark.llamafactory
IM_END = "<|im_end|>\n"  # what LLaMA-Factory's chatml template appends to a response, labelled too
CUTOFF = 768  # some pool answers are longer: their candidates must be dropped, never trained on truncated


@pytest.fixture(scope="session")
def lf_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer."""
    return build_tiny_smollm2(tmp_path_factory.mktemp("lf-tiny"))


def make_data(root: Path, grape: object = None) -> Path:
    """dataset_dir with pooled rows (4 instructions x 8 generators), a ranking set and an untouched plain set;
    ``grape`` replaces the pooled entry's option."""
    data = root / "data"
    data.mkdir()
    (data / "pool.json").write_text(json.dumps(pool_rows(4)))
    for name, demo, n in (("dpo", "dpo_en_demo", 4), ("plain", "alpaca_en_demo", 3)):
        rows = json.loads((LLAMAFACTORY_DATA / f"{demo}_60.json").read_text())[:n]
        (data / f"{name}.json").write_text(json.dumps(rows))
    info = {
        "pool": {"file_name": "pool.json", "columns": {"prompt": "instruction", "response": "output"},
                 "grape": {"top_k": 1} if grape is None else grape},
        "dpo": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}, "grape": {}},
        "plain": {"file_name": "plain.json"},
    }  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return data


def write_config(path: Path, model: Path, data: Path, **overrides) -> Path:
    """A CPU SFT config (one LoRA step) that saves its tokenized dataset."""
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 4, "lora_target": "all", "dataset": "pool,dpo,plain", "dataset_dir": str(data),
        "template": "chatml", "cutoff_len": CUTOFF, "overwrite_cache": True, "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0, "tokenized_path": str(path.parent / "tokenized"),
        "output_dir": str(path.parent / "sft"), "overwrite_output_dir": True, "logging_steps": 1,
        "save_strategy": "no", "plot_loss": False, "report_to": "none", "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-4, "max_steps": 1, "bf16": False, "fp16": False, "use_cpu": True, **overrides,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    """A command of this environment, with its own GRAPE cache; output checked by the caller."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # torchrun, as when active
    full = {**os.environ, "PATH": path, "GRAPE_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-m", *args], env=full, capture_output=True, text=True, timeout=600)


def trained_labels(tokenized: Path, model: Path) -> list[str]:
    """The labelled text of every row LLaMA-Factory saved for training."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = load_from_disk(str(tokenized))["train"]
    return [tok.decode([t for t in r["labels"] if t != -100]) for r in rows]


@pytest.fixture(scope="session")
def direct_picks(lf_model):
    """``picks([(system, question, answers)]) -> [(winner, gap to the runner-up) or None]``, scored from scratch.

    chatml by hand, each slot encoded on its own as LLaMA-Factory does; one forward pass per candidate; the mean
    log-prob of the response and its end-of-turn tokens; a candidate longer than CUTOFF never wins.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lf_model)
    model = AutoModelForCausalLM.from_pretrained(lf_model, dtype=torch.float32).eval()

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    @functools.cache  # the e2e tests share their data
    def mean_logprob(system: str, question: str, answer: str) -> float | None:
        prompt = encode(f"<|im_start|>system\n{system}{IM_END}") if system else []
        prompt += encode(f"<|im_start|>user\n{question}{IM_END}<|im_start|>assistant\n")
        response = encode(answer + IM_END)
        if len(prompt) + len(response) > CUTOFF:
            return None
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        return logp[len(prompt) - 1 :].gather(1, ids[0, len(prompt) :, None]).mean().item()

    def picks(items: list[tuple[str, str, list[str]]]) -> list[tuple[str, float] | None]:
        out = []
        for system, question, answers in items:
            scores = ((mean_logprob(system, question, a), a) for a in answers)
            scored = sorted(((s, a) for s, a in scores if s is not None), reverse=True)
            gap = scored[0][0] - scored[1][0] if len(scored) > 1 else float("inf")
            out.append((scored[0][1], gap) if scored else None)
        return out

    return picks


def expected_labels(data: Path, direct_picks) -> tuple[list[str], list[bool]]:
    """What SFT on the selection trains on, in order (pool winners, dpo winners, plain rows); which wins are clear."""
    pool = pool_rows(4)
    questions = dict.fromkeys(r["instruction"] for r in pool)
    items = [("", q, [r["output"] for r in pool if r["instruction"] == q]) for q in questions]
    for r in json.loads((data / "dpo.json").read_text()):
        turns = {t["from"]: t["value"] for t in r["conversations"]}
        items.append((turns.get("system", ""), turns["human"], [r["chosen"]["value"], r["rejected"]["value"]]))
    picked = [p for p in direct_picks(items) if p is not None]
    plain = json.loads((data / "plain.json").read_text())
    labels = [answer + IM_END for answer, _ in picked] + [r["output"] + IM_END for r in plain]
    clear = [gap > 1e-4 for _, gap in picked] + [True] * len(plain)
    return labels, clear


def assert_trained_on_selection(got: list[str], want: tuple[list[str], list[bool]]) -> None:
    labels, clear = want
    assert len(got) == len(labels)
    assert sum(clear) >= len(clear) - 2, "the tiny model should separate most candidates"
    assert [g for g, c in zip(got, clear) if c] == [w for w, c in zip(labels, clear) if c]


def digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def selection_folder(cache: Path) -> Path:
    (folder,) = (cache / "llamafactory").iterdir()
    return folder


def test_train_trains_on_the_selection_and_a_rerun_reuses_it(lf_model, tmp_path, direct_picks):
    data = make_data(tmp_path)
    before = digest(data)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data)
    first = run(["grape_plugin.cli", "llamafactory", "train", str(cfg)], tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-4000:]
    folder = selection_folder(tmp_path / "cache")
    assert f"GRAPE selection written to {folder}" in first.stderr
    labels = trained_labels(tmp_path / "tokenized", lf_model)
    assert_trained_on_selection(labels, expected_labels(data, direct_picks))
    report = json.loads((folder / "report.json").read_text())
    assert report["dropped"]["candidates"]["too_long"] > 0 and "truncated" not in report["dropped"]["candidates"]
    generators = {r["generator"] for r in pool_rows(4)}
    assert set(report["wins_per_source"]) <= generators | {"chosen", "rejected"}
    assert (folder / "scores.jsonl").is_file()
    assert digest(data) == before, "the user's files are never modified"

    again = [str(cfg), f"output_dir={tmp_path / 'sft2'}", f"tokenized_path={tmp_path / 'tokenized2'}"]
    second = run(["grape_plugin.cli", "llamafactory", "train", *again], tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"GRAPE selection reused from {folder}" in second.stderr
    assert trained_labels(tmp_path / "tokenized2", lf_model) == labels


def test_torchrun_ranks_share_the_scoring(lf_model, tmp_path, direct_picks):
    data = make_data(tmp_path)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data)
    two_ranks = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    done = run(["grape_plugin.cli", "llamafactory", "train", str(cfg)], tmp_path / "cache", **two_ranks)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((selection_folder(tmp_path / "cache") / "report.json").read_text())
    assert 0 < report["scored_by_this_rank"] < report["scored"], "rank 0 scored only its share"
    assert_trained_on_selection(trained_labels(tmp_path / "tokenized", lf_model), expected_labels(data, direct_picks))


def test_offline_select_then_plain_llamafactory_cli(lf_model, tmp_path, direct_picks):
    data = make_data(tmp_path)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data)
    out = tmp_path / "selected"
    done = run(["grape_plugin.cli", "llamafactory", "select", str(cfg), "-o", str(out)], tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"llamafactory-cli train {out / 'train.yaml'}" in done.stdout
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["plain"] == {"file_name": str(data / "plain.json")}, "other entries are kept, with absolute paths"
    assert info["dpo"]["ranking"] is False and "grape" not in info["pool"]
    assert {"report.json", "scores.jsonl"} <= set(os.listdir(out))
    trained = run(["llamafactory.cli", "train", str(out / "train.yaml")], tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert_trained_on_selection(trained_labels(tmp_path / "tokenized", lf_model), expected_labels(data, direct_picks))


def plan_for(tmp_path: Path, model: Path, **overrides):
    from grape_plugin.integrations.llamafactory.compat import read_args
    from grape_plugin.integrations.llamafactory.host import plan

    data = make_data(tmp_path)
    return plan(read_args([str(write_config(tmp_path / "train.yaml", model, data, **overrides))]))


def test_ranking_rows_are_two_candidates_and_max_samples_keeps_whole_instructions(lf_model, tmp_path):
    plan = plan_for(tmp_path, lf_model, max_samples=2)
    groups = plan.read().groups
    assert [len(g.candidates) for g in groups if g.candidates[0].part == 0] == [8, 8]  # part 0: pool
    ranking = [g for g in groups if g.candidates[0].part == 1]  # part 1: dpo
    assert [[c.source for c in g.candidates] for g in ranking] == [["chosen", "rejected"]] * 2


def set_grape(data: Path, **options) -> Path:
    """Every selected entry of ``data`` with the same new ``grape`` options."""
    info = json.loads((data / "dataset_info.json").read_text())
    for entry in info.values():
        if "grape" in entry:
            entry["grape"] = options
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


def select(cfg: Path, out: Path, *overrides: str) -> tuple[dict, dict]:
    """``grape-plugin llamafactory select`` in this process: (report.json, selection.json) of ``out``."""
    assert main(["llamafactory", "select", str(cfg), *overrides, "-o", str(out)]) == 0
    return tuple(json.loads((out / name).read_text()) for name in ("report.json", "selection.json"))


def test_a_fully_cached_rerun_loads_no_weights(lf_model, tmp_path, monkeypatch):
    """Another top_k and another fit metric: a new selection from the cached per-token values, no weights."""
    from grape_plugin.integrations.llamafactory import compat

    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_data(tmp_path)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data)
    first, first_manifest = select(cfg, tmp_path / "one")
    assert first["model_loaded"] and first["scored"] > 0
    set_grape(data, top_k=2, metric="min_k")  # a new selection of the same candidates, by another metric

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded although every score is cached")

    monkeypatch.setattr(compat, "load_model", no_weights)
    second, manifest = select(cfg, tmp_path / "two")
    assert manifest["key"] != first_manifest["key"] and manifest["report"]["model_loaded"] is False
    assert second["scored"] == 0 and second["cached"] > 0 and second["model_loaded"] is False
    assert second["candidates_kept"] > first["candidates_kept"]


def test_max_samples_with_top_k_keeps_whole_instructions_per_entry(lf_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    data = set_grape(make_data(tmp_path), top_k=2)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data, max_samples=2, cutoff_len=2048)  # none too long
    report, _ = select(cfg, tmp_path / "out")
    # 2 instructions read per entry, 2 rows kept of each: the second would push an entry to 4 rows > max_samples
    assert report["dropped"]["instructions"]["over_max_samples"] == 2
    assert report["dropped"]["candidates"]["over_max_samples"] == 4
    for name in ("pool", "dpo"):
        rows = (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == 2 and len({json.dumps(json.loads(r)["messages"][:-1]) for r in rows}) == 1


def test_an_existing_tokenized_path_skips_selection_with_a_warning(lf_model, tmp_path, caplog):
    (tmp_path / "tokenized").mkdir()
    (tmp_path / "tokenized" / "dataset_dict.json").write_text("{}")
    assert plan_for(tmp_path, lf_model) is None
    assert "tokenized_path" in caplog.text and "GRAPE selection skipped" in caplog.text


@pytest.mark.parametrize(
    ("grape", "overrides", "message"),
    [
        ({"top_kk": 1}, {}, "dataset 'pool': grape: unknown key 'top_kk'; expected one of:"),
        ({"model": "gpt2"}, {}, "dataset 'pool': grape: 'model' cannot be set here"),
        ({"top_k": 0}, {}, "top_k: Input should be greater than or equal to 1"),
        ({"max_length": 4096}, {}, "max_length 4096 exceeds the run's cutoff_len 768"),
        ("yes", {}, "dataset 'pool': grape: must be an object of GRAPE options"),
        ({"candidates_column": "outputs"}, {}, "pool.json: --candidates-column outputs: no such column"),
        (None, {"stage": "pt"}, "GRAPE selects SFT data, but this run's stage is 'pt'"),
        ({"top_k": 2}, {}, "datasets 'pool' and 'dpo' are selected together (candidates are grouped by prompt across "
                           "them) but their GRAPE options differ in 'top_k' (2 vs 1); make them equal"),
    ],
)
def test_a_bad_option_fails_clearly(lf_model, tmp_path, capsys, grape, overrides, message):
    cfg = write_config(tmp_path / "train.yaml", lf_model, make_data(tmp_path, grape), **overrides)
    assert main(["llamafactory", "train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "grape-plugin: error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "sft").exists(), "nothing trained"


def test_a_sharegpt_entry_with_per_row_ids_keeps_one_response_per_prompt(lf_model, tmp_path, monkeypatch, direct_picks):
    """Tulu-3 style: every row has its own id, so candidates group by prompt, not by id."""
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_data(tmp_path)
    pool = pool_rows(4)
    rows = [{"id": f"ai2-adapt-dev/pool_{n}", "source": r["generator"], "messages": [
        {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for n, r in enumerate(pool)]  # fmt: skip
    (data / "tulu.json").write_text(json.dumps(rows))
    info = json.loads((data / "dataset_info.json").read_text())
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info["tulu"] = {"file_name": "tulu.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                    "tags": tags, "grape": {"top_k": 1}}  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info))
    report, _ = select(write_config(tmp_path / "train.yaml", lf_model, data, dataset="tulu"), tmp_path / "out")
    kept = [json.loads(line) for line in (tmp_path / "out" / "tulu.jsonl").read_text().splitlines()]
    questions = dict.fromkeys(r["instruction"] for r in pool)
    picked = direct_picks([("", q, [r["output"] for r in pool if r["instruction"] == q]) for q in questions])
    assert len(kept) == report["instructions_kept"] == 4 and report["instructions_compared"] == 4
    clear = [(k["messages"][-1]["content"], winner) for k, (winner, gap) in zip(kept, picked) if gap > 1e-4]
    assert len(clear) >= 3 and all(got == want for got, want in clear)
    assert set(report["wins_per_source"]) <= {r["generator"] for r in pool}


def test_over_length_truncate_scores_a_long_candidate_as_llamafactory_cuts_it(lf_model, tmp_path, monkeypatch):
    """``over_length: truncate``: a candidate over cutoff_len is scored on the ids LLaMA-Factory keeps (a prefix of
    its response), counted as truncated, also when a rerun answers it from the cache."""
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    data = set_grape(make_data(tmp_path), over_length="truncate")
    cfg = write_config(tmp_path / "train.yaml", lf_model, data, cutoff_len=256)
    report, _ = select(cfg, tmp_path / "one")
    assert report["truncated"] > 0 and "too_long" not in report["dropped"]["candidates"]
    (tmp_path / "plan").mkdir()
    host = plan_for(tmp_path / "plan", lf_model, cutoff_len=256)
    renderer, grouped = host.train_renderer(host.scorer()), host.read()
    long = [(whole, renderer.cut(g, c)) for g in grouped.load(grouped.groups) for c in g.candidates
            if len((whole := renderer(g, c)).input_ids) > 256]  # fmt: skip
    assert long and all(len(cut.input_ids) <= 256 and cut.n_tokens < whole.n_tokens for whole, cut in long)
    for whole, cut in long:  # the response as far as LLaMA-Factory keeps it
        assert cut.input_ids[cut.start : cut.end].tolist() == whole.input_ids[whole.start :][: cut.n_tokens].tolist()
    set_grape(data, over_length="truncate", top_k=2)
    again, _ = select(cfg, tmp_path / "two")
    assert again["scored"] == 0 and again["truncated"] == report["truncated"]


def test_offline_select_refuses_a_folder_that_holds_the_runs_data(lf_model, tmp_path, capsys):
    data = make_data(tmp_path)
    before = digest(data)
    cfg = write_config(tmp_path / "train.yaml", lf_model, data)
    for out in (data, tmp_path):  # the dataset_dir itself (its dataset_info.json), and a folder above the files
        assert main(["llamafactory", "select", str(cfg), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"-o {out}: the output folder holds the input" in err and "Traceback" not in err
    assert digest(data) == before, "the user's files were modified"
