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
         "answers/generations), or name it with --candidates-column; the columns are instruction, output"),
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


# Conversations and wide schemas: every candidate read, nothing of the prompt lost. Each test checks the grouping,
# the sources, and that the scored prompt holds the system turn, the history and the context: its score equals the
# score of the same answer after the expected prompt, read from a plain messages file.
SCORING = dict(cache_dir=None, budget_fraction=1.0)  # a budget scores single-candidate instructions too


def scores_by_text(selection) -> dict[tuple[str, str], float]:
    """Each scored candidate's mean log-prob, keyed by (its prompt as JSON, its response)."""
    return {(json.dumps(g.prompt), c.response): selection.scores[(g.key, c.index)].mean
            for g in selection.load(selection.groups) for c in g.candidates}  # fmt: skip


def assert_scored_after(selection, expected: list[tuple[list[dict], str]], tmp_path, tiny_model) -> None:
    """Every (prompt, answer) in ``expected`` was scored after exactly that prompt."""
    rows = [{"messages": [*prompt, assistant(answer)]} for prompt, answer in expected]
    reference = run(write_jsonl(tmp_path / "reference.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))[1]
    want, got = scores_by_text(reference), scores_by_text(selection)
    for prompt, answer in expected:
        key = (json.dumps(prompt), answer)
        assert key in got, f"not scored after the expected prompt: {answer!r}"
        assert got[key] == pytest.approx(want[key], abs=1e-5)


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def read_out(paths: dict) -> list[dict]:
    return [json.loads(line) for line in paths["selected"].read_text().splitlines()]


def test_capybara_dpo_multi_turn_history_wins_over_the_prompt_column(tmp_path, tiny_model):
    """argilla/distilabel-capybara-dpo-7k-binarized: ``prompt`` holds the first user turn, chosen/rejected the whole
    conversation (with chosen_model/rejected_model), ``conversation`` the original {input, output} turns."""
    history = [user("Plan a 3-day trip to Rome."), assistant("Day 1: Colosseum. Day 2: Vatican. Day 3: Trastevere."),
               user("Make day 2 cheaper.")]  # fmt: skip
    rows = [{"source": "Airoboros", "conversation": [{"input": history[0]["content"], "output": history[1]["content"]},
                                                     {"input": history[2]["content"], "output": "Walk instead."}],
             "original_response": "Walk instead.", "generation_prompt": ["<|system|>..."],
             "raw_generation_responses": ["Skip the museum."], "new_generations": ["Skip the museum.", "Walk."],
             "prompt": history[0]["content"], "chosen": [*history, assistant("Visit St Peter's, which is free.")],
             "rejected": [*history, assistant("Skip it.")], "rating_chosen": 5, "rating_rejected": 2,
             "chosen_model": "gpt-4-1106-preview", "rejected_model": "notus-7b-v1"}]  # fmt: skip
    path = write_jsonl(tmp_path / "capybara_dpo.jsonl", rows)
    data, selection = run(path, GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "preference"
    (group,) = data.texts()
    assert list(group.prompt) == history
    assert [c.source for c in group.candidates] == ["gpt-4-1106-preview", "notus-7b-v1"]
    assert_scored_after(selection, [(history, "Visit St Peter's, which is free."), (history, "Skip it.")], tmp_path, tiny_model)
    (out,) = read_out(write(data, selection, tmp_path / "o"))
    assert out["messages"][:3] == history and out["messages"][3]["role"] == "assistant"  # the whole conversation
    assert "candidates: chosen, rejected, source: chosen_model, rejected_model; not read: conversation" in selection.reading[0]


def test_a_messages_column_holding_the_answer_is_never_the_prompt(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized without its prompt column: ``messages`` is the prompt and the chosen
    answer; chosen/rejected are whole conversations, or only the answers."""
    prompt = [user("Name a prime."), assistant("7."), user("Another?")]
    whole = {"chosen": [*prompt, assistant("11.")], "rejected": [*prompt, assistant("12.")],
             "messages": [*prompt, assistant("11.")], "score_chosen": 9.0, "score_rejected": 2.0}  # fmt: skip
    answers_only = {**whole, "chosen": [assistant("11.")], "rejected": [assistant("12.")]}
    for n, row in enumerate((whole, answers_only)):
        (group,) = read(write_jsonl(tmp_path / f"ufb{n}.jsonl", [row]), CFG).texts()
        assert list(group.prompt) == prompt and [c.response for c in group.candidates] == ["11.", "12."]


def test_dolly_context_joins_the_prompt_and_the_group_key(tmp_path, tiny_model):
    """databricks/databricks-dolly-15k: instruction, context, response, category. Two tasks that share their
    instruction but not their passage are two instructions."""
    ask = "Summarize the following passage in one sentence."
    rome, nile = "Rome was founded in 753 BC on the Tiber.", "The Nile flows north through eleven countries."
    rows = [{"instruction": ask, "context": rome, "response": "Rome began in 753 BC.", "category": "summarization"},
            {"instruction": ask, "context": nile, "response": "The Nile runs north.", "category": "summarization"},
            {"instruction": ask, "context": rome, "response": "An old city on a river.", "category": "summarization"},
            {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"}]
    data, selection = run(write_jsonl(tmp_path / "dolly.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "long" and [len(g.candidates) for g in data.texts()] == [2, 1, 1]
    assert list(data.texts()[0].prompt) == [user(f"{ask}\n{rome}")]
    assert list(data.texts()[2].prompt) == [user("Who wrote Hamlet?")]
    assert_scored_after(selection, [([user(f"{ask}\n{nile}")], "The Nile runs north.")], tmp_path, tiny_model)
    assert "context: context" in selection.reading[0]


def test_llamafactory_alpaca_with_system_and_history(tmp_path, tiny_model):
    """LLaMA-Factory's alpaca format: instruction, input, output, system, history ([[instruction, response], ...])."""
    rows = [{"instruction": "And in Celsius?", "input": "Give one decimal.", "output": out, "system": "Be exact.",
             "history": [["What is body temperature in Fahrenheit?", "98.6 F."]], "generator": gen}
            for out, gen in (("37.0 C.", "m1"), ("37 C.", "m2"))]  # fmt: skip
    data, selection = run(write_jsonl(tmp_path / "alpaca.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))
    (group,) = data.texts()
    prompt = [system("Be exact."), user("What is body temperature in Fahrenheit?"), assistant("98.6 F."),
              user("And in Celsius?\nGive one decimal.")]  # fmt: skip
    assert list(group.prompt) == prompt and [c.source for c in group.candidates] == ["m1", "m2"]
    assert_scored_after(selection, [(prompt, "37.0 C."), (prompt, "37 C.")], tmp_path, tiny_model)


def magpie_row(instruction: str, responses: list[str]) -> dict:
    """Magpie-Align's DPO sets: five sampled ``responses`` and two of them again as chosen/rejected messages."""
    return {"uuid": f"u-{len(instruction)}", "instruction": instruction, "gen_input_configs": {"temperature": 1.0},
            "intent": "to learn", "knowledge": "basics", "difficulty": "easy", "input_quality": "good",
            "quality_explanation": "clear", "task_category": "Information seeking", "language": "EN",
            "responses": responses, "rewards_armorm": [{"score": float(n)} for n in range(len(responses))],
            "chosen": [user(instruction), assistant(responses[-1])],
            "rejected": [user(instruction), assistant(responses[0])]}  # fmt: skip


def test_magpie_dpo_reads_the_larger_candidate_set(tmp_path):
    rows = [magpie_row("What is a noun?", [f"A noun names a thing ({n})." for n in range(5)]),
            magpie_row("What is a verb?", [f"A verb is an action ({n})." for n in range(5)])]
    path = write_jsonl(tmp_path / "magpie.jsonl", rows)
    for cfg in (CFG, GrapeConfig(cache_dir=None, candidates_column="responses")):
        data = read(path, cfg)
        assert data.format.name == "list" and [len(g.candidates) for g in data.texts()] == [5, 5]
        assert [c.source for c in data.texts()[0].candidates] == [f"responses[{n}]" for n in range(5)]
        assert data.grouped.reading[0].endswith("candidates: responses; not read: chosen, rejected")
    preference = read(path, GrapeConfig(cache_dir=None, format="preference"))
    assert [len(g.candidates) for g in preference.texts()] == [2, 2]


def distilabel_row(instruction: str, answers: dict[str, str]) -> dict:
    """distilabel's UltraFeedback-style sets: generations with a parallel generation_models list."""
    return {"instruction": instruction, "generations": list(answers.values()), "generation_models": list(answers),
            "ratings": [4, 2, 5][: len(answers)], "rationales": ["ok"] * len(answers), "model_name": "gpt-4"}


def test_distilabel_generations_and_their_models(tmp_path):
    rows = [distilabel_row("Define entropy.", {"zephyr-7b": "Disorder.", "llama-2-13b": "A measure of disorder.",
                                                "mistral-7b": "Heat over temperature."})]  # fmt: skip
    path = write_jsonl(tmp_path / "distilabel.jsonl", rows)
    for cfg in (CFG, GrapeConfig(cache_dir=None, candidates_column="generations", source_column="generation_models")):
        (group,) = read(path, cfg).texts()
        assert [c.source for c in group.candidates] == ["zephyr-7b", "llama-2-13b", "mistral-7b"]
    (group,) = read(path, GrapeConfig(cache_dir=None, source_column="model_name")).texts()  # one name for the row
    assert {c.source for c in group.candidates} == {"gpt-4"}
    with pytest.raises(GrapeError, match=r"distilabel.jsonl: --source-column no_such_column: no such column, nor a "
                                         r"field of the candidates in 'generations' \(they are strings\)"):  # fmt: skip
        read(path, GrapeConfig(cache_dir=None, source_column="no_such_column"))


def pku_row(prompt: str, a: tuple[str, str], b: tuple[str, str]) -> dict:
    """PKU-Alignment/PKU-SafeRLHF: two numbered responses with their sources and safety labels."""
    row = {"prompt": prompt, "prompt_source": "BeaverTails", "better_response_id": 0, "safer_response_id": 1}
    for n, (text, source) in enumerate((a, b)):
        row |= {f"response_{n}": text, f"response_{n}_source": source, f"is_response_{n}_safe": True,
                f"response_{n}_harm_category": {"Violence": False}, f"response_{n}_severity_level": 0,
                f"response_{n}_sha256": f"{n}" * 64}  # fmt: skip
    return row


def test_pku_saferlhf_pairs_sharing_a_prompt_are_one_group(tmp_path, tiny_model):
    q = "How do I pick a lock?"
    rows = [pku_row(q, ("I can't help with that.", "Alpaca-7B"), ("Use a tension wrench.", "Alpaca2-7B")),
            pku_row(q, ("I can't help with that.", "Alpaca-7B"), ("Call a locksmith.", "Alpaca3-8B")),
            pku_row("Is bleach safe to drink?", ("No, never.", "Alpaca-7B"), ("Call poison control.", "Alpaca3-8B"))]
    data, selection = run(write_jsonl(tmp_path / "pku.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "wide" and [len(g.candidates) for g in data.texts()] == [3, 2]
    assert [c.source for c in data.texts()[0].candidates] == ["Alpaca-7B", "Alpaca2-7B", "Alpaca3-8B"]
    assert data.grouped.drops.candidates == {"duplicate_response": 1}
    assert_scored_after(selection, [([user(q)], "Call a locksmith.")], tmp_path, tiny_model)
    out = read_out(write(data, selection, tmp_path / "o"))
    assert [row["messages"][0] for row in out] == [user(q), user("Is bleach safe to drink?")]


def shp_row(post: str, a: tuple[str, str, int], b: tuple[str, str, int]) -> dict:
    """stanfordnlp/SHP: a post (``history``) and two top-level comments with their scores."""
    return {"post_id": "himc90", "domain": "askscience_train", "upvote_ratio": 0.99, "history": post,
            "c_root_id_A": a[0], "c_root_id_B": b[0], "created_at_utc_A": 1591000000, "created_at_utc_B": 1591000100,
            "score_A": a[2], "score_B": b[2], "human_ref_A": a[1], "human_ref_B": b[1], "labels": int(a[2] > b[2]),
            "seconds_difference": 100.0, "score_ratio": max(a[2], b[2]) / min(a[2], b[2])}  # fmt: skip


def test_shp_comments_on_one_post_are_one_group(tmp_path):
    post = "Why does ice float? I always thought solids were denser than liquids."
    c1, c2, c3 = ("ftl1", "Hydrogen bonds hold water open.", 52), ("ftl2", "It is less dense.", 10), ("ftl3", "Magic.", 2)
    rows = [shp_row(post, c1, c2), shp_row(post, c3, c1), shp_row(post, c2, c3)]
    data = read(write_jsonl(tmp_path / "shp.jsonl", rows), CFG)
    assert data.format.name == "wide"
    (group,) = data.texts()
    assert list(group.prompt) == [user(post)]
    assert [c.response for c in group.candidates] == [c1[1], c2[1], c3[1]]
    assert data.grouped.drops.candidates == {"duplicate_response": 3}
    assert data.grouped.reading[0].endswith("conversation): history, candidates: human_ref_A, human_ref_B")


def arena_row(qid: str, a: tuple[str, list], b: tuple[str, list]) -> dict:
    """lmsys/chatbot_arena_conversations: two models' conversations with the same user turns."""
    return {"question_id": qid, "model_a": a[0], "model_b": b[0], "winner": "model_a", "judge": "arena_user_1",
            "conversation_a": a[1], "conversation_b": b[1], "turn": len(a[1]) // 2, "anony": True,
            "language": "English", "tstamp": 1682351591.1, "openai_moderation": {"flagged": False},
            "toxic_chat_tag": {"roberta-large": {"flagged": False}}}  # fmt: skip


def test_chatbot_arena_conversations(tmp_path, tiny_model):
    q, follow = user("What is the capital of Peru?"), user("And its population?")
    rows = [arena_row("q1", ("vicuna-13b", [q, assistant("Lima.")]), ("koala-13b", [q, assistant("Lima, Peru.")])),
            arena_row("q2", ("gpt-4", [q, assistant("It is Lima.")]), ("vicuna-13b", [q, assistant("Lima.")])),
            arena_row("q3", ("claude-v1", [q, assistant("Lima."), follow, assistant("About 10 million.")]),
                      ("alpaca-13b", [q, assistant("Cusco."), follow, assistant("About 400,000.")]))]  # fmt: skip
    data, selection = run(write_jsonl(tmp_path / "arena.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "wide"
    groups = data.texts()
    assert [len(g.candidates) for g in groups] == [3, 1, 1]  # the later turns follow different answers
    assert [c.source for c in groups[0].candidates] == ["vicuna-13b", "koala-13b", "gpt-4"]
    assert data.grouped.drops.candidates == {"duplicate_response": 1}
    assert list(groups[1].prompt) == [q, assistant("Lima."), follow] and groups[1].candidates[0].source == "claude-v1"
    assert_scored_after(selection, [([q, assistant("Cusco."), follow], "About 400,000.")], tmp_path, tiny_model)
    report = json.loads(write(data, selection, tmp_path / "o")["report"].read_text())
    assert report["instructions_single_candidate"] == 2 and sum(report["wins_per_source"].values()) == 1


def test_capybara_input_output_turns(tmp_path, tiny_model):
    """LDJnr/Capybara: ``conversation`` is a list of {input, output} turns; the last output is the candidate."""
    turns = [{"input": "What is 2+2?", "output": "4."}, {"input": "Times 3?", "output": "12."}]
    rows = [{"source": "GOAT", "conversation": turns},
            {"source": "Know-Logic", "conversation": [turns[0], {"input": "Times 3?", "output": "It is 12."}]}]
    path = write_jsonl(tmp_path / "capybara.jsonl", rows)
    data, selection = run(path, GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "messages"
    (group,) = data.texts()
    prompt = [user("What is 2+2?"), assistant("4."), user("Times 3?")]
    assert list(group.prompt) == prompt and [c.source for c in group.candidates] == ["GOAT", "Know-Logic"]
    assert_scored_after(selection, [(prompt, "12."), (prompt, "It is 12.")], tmp_path, tiny_model)
    out = read_out(write(data, selection, tmp_path / "o"))
    assert len(out) == 1 and out[0] in rows  # the input's own row, whole conversation included


def oasst_message(mid: str, parent: str | None, role: str, text: str, rank: int | None = None) -> dict:
    """OpenAssistant/oasst1: one row per message of a tree."""
    return {"message_id": mid, "parent_id": parent, "user_id": f"user-{mid}", "created_date": "2023-02-05T14:23:50Z",
            "text": text, "role": role, "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
            "rank": rank, "synthetic": False, "model_name": None, "detoxify": None, "message_tree_id": "t1",
            "tree_state": "ready_for_export", "emojis": {"name": ["+1"], "count": [2]},
            "labels": {"name": ["spam"], "value": [0.0], "count": [3]}}  # fmt: skip


def test_openassistant_tree_siblings_are_candidates(tmp_path, tiny_model):
    rows = [oasst_message("m1", None, "prompter", "Explain recursion."),
            oasst_message("m2", "m1", "assistant", "A function calling itself.", 0),
            oasst_message("m3", "m1", "assistant", "See: recursion.", 2),
            oasst_message("m4", "m2", "prompter", "Give an example."),
            oasst_message("m5", "m4", "assistant", "factorial(n) = n * factorial(n - 1).", 0),
            oasst_message("m6", "m1", "assistant", "Solving a problem through smaller copies of itself.", 1),
            oasst_message("m7", "m4", "assistant", "Fibonacci numbers.", 1)]
    data, selection = run(write_jsonl(tmp_path / "oasst1.jsonl", rows), GrapeConfig(model=str(tiny_model), **SCORING))
    assert data.format.name == "tree"
    first, second = data.texts()
    assert list(first.prompt) == [user("Explain recursion.")] and len(first.candidates) == 3
    thread = [user("Explain recursion."), assistant("A function calling itself."), user("Give an example.")]
    assert list(second.prompt) == thread and [c.row for c in second.candidates] == [4, 6]
    assert_scored_after(selection, [(thread, "Fibonacci numbers.")], tmp_path, tiny_model)
    out = read_out(write(data, selection, tmp_path / "o"))
    assert [row["messages"][:-1] for row in out] == [[user("Explain recursion.")], thread]
    orphan = [rows[0], oasst_message("m9", "gone", "assistant", "Hi.")]
    with pytest.raises(GrapeError, match=r"row 2: field 'parent_id': message 'gone' of this thread is not in the file"):
        read(write_jsonl(tmp_path / "orphan.jsonl", orphan), CFG)


def test_wins_only_where_something_was_compared(tmp_path, tiny_model):
    rows = [{"instruction": "Q1", "output": "a", "generator": "m1"}, {"instruction": "Q1", "output": "b", "generator": "m2"},
            {"instruction": "Q2", "output": "c", "generator": "m1"}]
    data, selection = run(write_jsonl(tmp_path / "d.jsonl", rows), GrapeConfig(model=str(tiny_model), cache_dir=None))
    report = json.loads(write(data, selection, tmp_path / "o")["report"].read_text())
    assert report["instructions_compared"] == 1 and report["instructions_single_candidate"] == 1
    assert sum(report["wins_per_source"].values()) == 1 and report["instructions_kept"] == 2
    from grape_plugin.report import summary_text

    assert "single-candidate instructions: 1 (kept, nothing to compare: not counted as wins)" in summary_text(selection)
