"""Popular public datasets in their exact schemas (small files written from their dataset cards): each read with
no flags but a split name, grouped, prompted and attributed right; and the misuses that must fail loudly."""

from __future__ import annotations

import json

import pytest
from tests.helpers import write_jsonl

from grape_plugin import GrapeConfig, GrapeError, read, run, write

CFG = GrapeConfig(cache_dir=None)
HH_PROMPT = "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is popular.\n\nHuman: Another one?\n\nAssistant:"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def ultrafeedback_row(instruction: str, answers: dict[str, str]) -> dict:
    """openbmb/UltraFeedback: a list of completion objects and a parallel list of model names."""
    completion = {"custom_system_prompt": "", "principle": "helpfulness", "critique": "ok", "overall_score": 7.5,
                  "annotations": {"helpfulness": {"Rating": "4"}}, "fine-grained_score": 4.0}  # fmt: skip
    return {"source": "false_qa", "instruction": instruction, "models": list(answers),
            "completions": [{**completion, "model": m, "response": r} for m, r in answers.items()],
            "correct_answers": ["none"], "incorrect_answers": ["none"]}  # fmt: skip


def test_ultrafeedback_raw(tmp_path, tiny_model):
    rows = [ultrafeedback_row("What is 2+2?", {"gpt-4": "4.", "alpaca-7b": "It is four.", "falcon-40b": "5"}),
            ultrafeedback_row("Name a colour.", {"gpt-4": "Red.", "alpaca-7b": "Blue", "falcon-40b": "Green!"})]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    data = read(path, CFG)
    assert data.format.name == "list" and [len(g.candidates) for g in data.texts()] == [3, 3]
    first = data.texts()[0]
    assert list(first.prompt) == [user("What is 2+2?")]
    assert [(c.response, c.source) for c in first.candidates] == [("4.", "gpt-4"), ("It is four.", "alpaca-7b"),
                                                                   ("5", "falcon-40b")]  # fmt: skip
    data, selection = run(path, GrapeConfig(model=str(tiny_model), cache_dir=None))
    out = [json.loads(line) for line in write(data, selection, tmp_path / "o")["selected"].read_text().splitlines()]
    assert len(out) == 2 and all(row["source"] == "false_qa" for row in out)  # the input's own column, unchanged
    assert all(set(row) == set(rows[0]) | {"grape_response", "grape_source"} for row in out)
    assert out[0]["grape_source"] in ("gpt-4", "alpaca-7b", "falcon-40b")


def test_ultrafeedback_binarized_needs_its_split(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a DatasetDict without a train split."""
    from datasets import Dataset, DatasetDict

    def pref(i: int) -> dict:
        prompt = f"Question {i}?"
        return {"prompt": prompt, "prompt_id": f"{i:064x}", "chosen": [user(prompt), assistant(f"good {i}")],
                "rejected": [user(prompt), assistant(f"bad {i}")], "messages": [user(prompt), assistant(f"good {i}")],
                "score_chosen": 8.0, "score_rejected": 4.0}  # fmt: skip

    splits = {name: Dataset.from_list([pref(i) for i in range(3)])
              for name in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")}  # fmt: skip
    DatasetDict(splits).save_to_disk(str(tmp_path / "ufb"))
    with pytest.raises(GrapeError, match="no split 'train'; its splits are train_prefs, test_prefs, train_sft, "
                                         "test_sft, train_gen, test_gen: name one with --split"):  # fmt: skip
        read(tmp_path / "ufb", CFG)
    data = read(tmp_path / "ufb", GrapeConfig(cache_dir=None, split="train_prefs"))
    assert data.format.name == "preference" and len(data.texts()) == 3
    group = data.texts()[1]
    assert list(group.prompt) == [user("Question 1?")]
    assert [(c.response, c.source) for c in group.candidates] == [("good 1", "chosen"), ("bad 1", "rejected")]


def test_nectar(tmp_path):
    """berkeley-nest/Nectar: a dialogue-text prompt and a list of answer objects with their model and rank."""
    answers = [{"answer": "Mittens.", "model": "gpt-4", "rank": 1.0}, {"answer": "Tom.", "model": "llama-2-7b-chat", "rank": 2.0}]
    row = {"prompt": HH_PROMPT, "answers": answers, "turns": 2, "num_responses": 2, "source": ["anthropic-hh"],
           "good_natured": True}  # fmt: skip
    (group,) = read(write_jsonl(tmp_path / "nectar.jsonl", [row]), CFG).texts()
    assert list(group.prompt) == [user("What is a good name for a cat?"), assistant("Whiskers is popular."), user("Another one?")]
    assert [(c.response, c.source) for c in group.candidates] == [("Mittens.", "gpt-4"), ("Tom.", "llama-2-7b-chat")]


def test_hh_rlhf(tmp_path):
    """Anthropic/hh-rlhf: chosen and rejected are whole transcripts that share everything but the last answer."""
    rows = [{"chosen": HH_PROMPT + " Mittens is nice.", "rejected": HH_PROMPT + " No."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
    data = read(write_jsonl(tmp_path / "hh.jsonl", rows), CFG)
    assert data.format.name == "preference" and len(data.texts()) == 2
    first = data.texts()[0]
    assert list(first.prompt) == [user("What is a good name for a cat?"), assistant("Whiskers is popular."), user("Another one?")]
    assert [(c.response, c.source) for c in first.candidates] == [("Mittens is nice.", "chosen"), ("No.", "rejected")]
    assert [c.response for c in data.texts()[1].candidates] == ["Hello!", "Go away."]


def sharegpt(row_id: str, question: str, answer: str) -> dict:
    return {"id": row_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_sharegpt_with_per_row_ids_groups_by_prompt(tmp_path):
    rows = [sharegpt("QWJhYvA_0", "Tell a joke.", "Why did the chicken..."), sharegpt("QWJhYvA_1", "Say hi.", "Hi!"),
            sharegpt("x9Kk2Qe_0", "Tell a joke.", "A man walks into a bar...")]  # fmt: skip
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    data = read(path, CFG)
    assert [len(g.candidates) for g in data.texts()] == [2, 1] and data.texts()[0].key.startswith("p:")
    assert [c.response for c in data.texts()[0].candidates] == ["Why did the chicken...", "A man walks into a bar..."]
    by_id = read(path, GrapeConfig(cache_dir=None, group_by="id"))
    assert [len(g.candidates) for g in by_id.texts()] == [1, 1, 1]


def test_nothing_compared_is_said_plainly(tmp_path, tiny_model):
    rows = [sharegpt(f"row_{i}", q, "A.") for i, q in enumerate(("One?", "Two?"))]
    data, selection = run(write_jsonl(tmp_path / "s.jsonl", rows), GrapeConfig(model=str(tiny_model), cache_dir=None))
    report = json.loads(write(data, selection, tmp_path / "o")["report"].read_text())
    assert report["instructions_compared"] == 0 and report["wins_per_source"] == {}
    assert "nothing was compared" in report["note"] and "--group-by prompt" in report["note"]
    from grape_plugin.report import summary_text

    assert "wins per source" not in summary_text(selection) and "nothing was compared" in summary_text(selection)


def test_tulu3_sft_mixture_groups_by_prompt(tmp_path):
    """allenai/tulu-3-sft-mixture: every row its own id, messages, and a source dataset."""
    rows = [{"id": f"ai2-adapt-dev/oasst1_converted_{i}", "messages": [user(q), assistant(a)],
             "source": src} for i, (q, a, src) in enumerate([("Why is the sky blue?", "Rayleigh scattering.", "oasst1"),
                                                            ("Why is the sky blue?", "Because of air.", "flan_v2"),
                                                            ("What is DNA?", "A molecule.", "oasst1")])]  # fmt: skip
    data = read(write_jsonl(tmp_path / "tulu.jsonl", rows), CFG)
    assert data.format.name == "messages" and [len(g.candidates) for g in data.texts()] == [2, 1]
    assert [c.source for c in data.texts()[0].candidates] == ["oasst1", "flan_v2"]


def test_helpsteer2(tmp_path):
    """nvidia/HelpSteer2: prompt/response rows, two responses per prompt, with attribute scores."""
    scores = {"helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 1}
    rows = [{"prompt": p, "response": r, **scores} for p, r in
            [("c#", "C# is a language."), ("c#", "A musical note."), ("What is 7*6?", "42"), ("What is 7*6?", "43")]]
    data = read(write_jsonl(tmp_path / "helpsteer2.jsonl", rows), CFG)
    assert data.format.name == "long" and [len(g.candidates) for g in data.texts()] == [2, 2]
    assert list(data.texts()[1].prompt) == [user("What is 7*6?")]


def test_a_bad_row_stops_the_run_or_is_skipped_and_counted(tmp_path):
    rows = [{"instruction": "Q", "output": "a"}, {"instruction": "Q", "output": "   "},
            {"instruction": "Q", "output": 3}, {"instruction": "R", "output": "b"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], rows[1], rows[3]])
    with pytest.raises(GrapeError, match=r"row 2: field 'output': is empty; to skip such rows and count them, set "
                                         r"on_bad_row: skip \(--on-bad-row skip\)"):  # fmt: skip
        read(path, CFG)
    data = read(path, GrapeConfig(cache_dir=None, on_bad_row="skip"))
    assert [len(g.candidates) for g in data.texts()] == [1, 1]
    assert data.grouped.drops.rows == {"output: is empty": 1}
    assert data.grouped.skipped == (f"{path}: row 2: field 'output': is empty",)


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ([{"instruction": "Q", "output": "a"}], {"format": "list"},
         "--format list needs a column holding a list of candidates (responses/candidates/outputs/completions/"
         "answers), or name it with --candidates-column; the columns are instruction, output"),
        ([ultrafeedback_row("Q", {"m1": "a", "m2": "b"})], {"candidates_column": "models"},
         "--candidates-column models: that column holds the candidates' sources, not their text; the candidates "
         "are in 'completions'"),
        ([{"instruction": "Q", "responses": "just one"}], {},
         "row 1: field 'responses': is a str, not a list of candidate responses (--candidates-column names the column"),
        ([{"instruction": "Q", "completions": [{"model": "m", "reply": "a"}]}], {},
         "row 1: field 'completions[0]': an object with fields model, reply: none holds the response text; name the "
         "field with --response-column"),
        ([{"instruction": "Q", "output": "a"}], {"group_by": "qid"}, "--group-by qid: no such column"),
    ],
)
def test_misused_options_name_the_column_and_the_option(tmp_path, rows, options, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(GrapeError) as err:
        read(path, GrapeConfig(cache_dir=None, **options))
    assert str(path) in str(err.value) and message in str(err.value)


def test_item_fields_follow_the_column_options(tmp_path):
    rows = [{"instruction": "Q", "completions": [{"who": "m1", "reply": "a"}, {"who": "m2", "reply": "b"}]}]
    (group,) = read(write_jsonl(tmp_path / "d.jsonl", rows),
                    GrapeConfig(cache_dir=None, response_column="reply", source_column="who")).texts()  # fmt: skip
    assert [(c.response, c.source) for c in group.candidates] == [("a", "m1"), ("b", "m2")]


def test_the_models_context_length_caps_sequences(tmp_path):
    from tests.helpers import build_tiny_model

    short = build_tiny_model(tmp_path / "short", max_positions=48)
    rows = [{"id": "a", "instruction": "Q", "output": "short"}, {"id": "a", "instruction": "Q", "output": "long " * 80}]
    _, selection = run(write_jsonl(tmp_path / "d.jsonl", rows), GrapeConfig(model=str(short), cache_dir=None))
    assert selection.drops.candidates == {"too_long": 1} and selection.kept == {"a": (0,)}
