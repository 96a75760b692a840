"""Reading every input shape into groups of candidates; bad rows fail with file, row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers import LLAMAFACTORY_DATA, POOL, pool_rows, write_jsonl

from grape_plugin import GrapeConfig, GrapeError, read

CFG = GrapeConfig(cache_dir=None)


def test_shared_pool_needs_no_flags():
    data = read(POOL, CFG)
    assert data.format.name == "long"
    assert len(data.texts()) == 111
    first = data.texts()[0]
    assert first.key == "ae-000"
    assert list(first.prompt) == [{"role": "user", "content": pool_rows(1)[0]["instruction"]}]
    assert [c.source for c in first.candidates][:2] == ["gpt-4o-2024-05-13", "Meta-Llama-3.1-405B-Instruct-Turbo"]
    n_candidates = sum(len(g.candidates) for g in data.texts())
    # data/README.md: 20 answers duplicate another model's answer to the same instruction
    assert data.grouped.drops.as_dict() == {"candidates": {"duplicate_response": 20}, "instructions": {}, "rows": {}}
    assert n_candidates == 888 - 20
    assert all(c.index == i for g in data.texts() for i, c in enumerate(g.candidates))


def test_rows_without_id_group_by_prompt(tmp_path):
    rows = [{"instruction": r["instruction"], "output": r["output"], "model": r["generator"]} for r in pool_rows(3)]
    data = read(write_jsonl(tmp_path / "noid.jsonl", rows[::-1]), CFG)  # order must not matter for grouping
    assert sorted(len(g.candidates) for g in data.texts()) == [8, 8, 8]
    assert all(g.key.startswith("p:") for g in data.texts())
    assert data.texts()[0].candidates[0].source == "Qwen1.5-1.8B-Chat"


def test_alpaca_input_and_system_join_the_prompt(tmp_path):
    rows = [{"system": "Be brief.", "instruction": "Add", "input": "2+2", "output": "4"}]
    (group,) = read(write_jsonl(tmp_path / "a.jsonl", rows), CFG).texts()
    assert list(group.prompt) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n2+2"}]


def test_list_column_and_sources(tmp_path):
    rows = [{"instruction": "Say hi", "responses": ["hi", "hello", "hi"], "generators": ["a", "b", "c"]}]
    data = read(write_jsonl(tmp_path / "l.jsonl", rows), CFG)
    assert data.format.name == "list"
    (group,) = data.texts()
    assert [(c.response, c.source) for c in group.candidates] == [("hi", "a"), ("hello", "b")]
    assert data.grouped.drops.candidates == {"duplicate_response": 1}


def test_messages_and_sharegpt(tmp_path):
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    rows = [{"messages": conv + [{"role": "assistant", "content": f"A2-{i}"}], "source": f"m{i}"} for i in range(3)]
    data = read(write_jsonl(tmp_path / "m.jsonl", rows), CFG)
    (group,) = data.texts()
    assert list(group.prompt) == conv and [c.response for c in group.candidates] == ["A2-0", "A2-1", "A2-2"]
    share = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": a}]} for a in ("x", "y")]
    (group,) = read(write_jsonl(tmp_path / "s.jsonl", share), CFG).texts()
    assert list(group.prompt) == [{"role": "user", "content": "Q"}] and len(group.candidates) == 2


def test_llamafactory_ranking_demo_gives_two_candidates():
    data = read(LLAMAFACTORY_DATA / "dpo_en_demo_60.json", CFG)
    assert data.format.name == "preference"
    raw = json.loads((LLAMAFACTORY_DATA / "dpo_en_demo_60.json").read_text())
    first = data.texts()[0]
    assert [c.source for c in first.candidates] == ["chosen", "rejected"]
    assert first.candidates[0].response == raw[0]["chosen"]["value"]
    assert first.prompt[-1]["content"] == raw[0]["conversations"][-1]["value"]


def test_trl_preference_shapes(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "R"}], "chosen": [{"role": "assistant", "content": "g"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ]
    for i, row in enumerate(rows):
        (group,) = read(write_jsonl(tmp_path / f"p{i}.jsonl", [row]), CFG).texts()
        assert len(group.candidates) == 2 and group.prompt[-1]["role"] == "user"
    implicit = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "g"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}
    (group,) = read(write_jsonl(tmp_path / "imp.jsonl", [implicit]), CFG).texts()
    assert list(group.prompt) == [{"role": "user", "content": "Q"}]


def test_min_candidates_drops_and_counts(tmp_path):
    rows = [{"id": "a", "instruction": "x", "output": "1"}, {"id": "a", "instruction": "x", "output": "2"},
            {"id": "b", "instruction": "y", "output": "3"}]
    data = read(write_jsonl(tmp_path / "m.jsonl", rows), GrapeConfig(cache_dir=None, min_candidates=2))
    assert [g.key for g in data.texts()] == ["a"]
    assert data.grouped.drops.as_dict() == {"candidates": {"too_few_candidates": 1}, "instructions": {"too_few_candidates": 1}, "rows": {}}


def test_a_format_may_drop_a_candidate_by_reason(tmp_path):
    """A host's format yields a ``Reason`` for a candidate its host would drop: counted, and the rest load back."""
    from grape_plugin.formats import Context, Input, LongRows, group_rows
    from grape_plugin.records import Reason

    class EmptyDropped(LongRows):
        def read_row(self, row, i, ctx):
            yield from [Reason.INVALID_EXAMPLE] if not row["output"] else super().read_row(row, i, ctx)

    rows = [{"instruction": "x", "output": o} for o in ("1", "", "2", "")]
    cfg = GrapeConfig(cache_dir=None)
    grouped = group_rows([Input(rows, EmptyDropped(), Context("f", ["instruction", "output"], cfg))], 1)
    assert grouped.drops.as_dict()["candidates"] == {"invalid_example": 2}
    assert [c.response for c in grouped.load(grouped.groups)[0].candidates] == ["1", "2"]


def test_parquet_csv_and_saved_dataset(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list(pool_rows(2))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("p.parquet", "p.csv", "saved"):
        data = read(tmp_path / path, CFG)
        assert [len(g.candidates) for g in data.texts()] == [8, 8]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "x", "output": ""}], "row 1: field 'output': is empty"),
        ([{"instruction": "x", "output": "a"}, {"instruction": "x", "output": 3}], "row 2: field 'output'"),
        ([{"instruction": "x", "output": "a"}, {"instruction": None, "output": "b"}], "row 2: field 'instruction': is missing"),
        ([{"question_text": "x", "reply": "a"}], "cannot tell the data's shape"),
        ([{"id": 1, "instruction": "x", "output": "a"}, {"id": 1, "instruction": "y", "output": "b"}],
         "row 2: field 'id': id '1' was first seen at row 1 with a different prompt"),
        ([{"messages": [{"role": "user", "content": "q"}]}], "row 1: field 'messages': has no assistant turn"),
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}],
         "row 1: field 'messages[1]': two 'user' turns in a row"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GrapeError, match=None) as err:
        read(path, CFG)
    assert str(path) in str(err.value) and message in str(err.value)


def test_malformed_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "x", "output": "a"}\n{"instruction": "x", "output": \n{"instruction": "y", "output": "b"}\n')
    with pytest.raises(GrapeError, match=r"broken.jsonl: line 2: not valid JSON"):
        read(path, CFG)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(GrapeError, match="no such file"):
        read(tmp_path / "nope.jsonl", CFG)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(GrapeError, match="empty.jsonl: the file is empty"):
        read(tmp_path / "empty.jsonl", CFG)


def test_named_columns_override_detection(tmp_path):
    rows = [{"instruction": "x", "reply": "a", "who": "m1", "qid": "q"}, {"instruction": "x", "reply": "b", "who": "m2", "qid": "q"}]
    cfg = GrapeConfig(cache_dir=None, response_column="reply", source_column="who", group_by="qid")
    (group,) = read(write_jsonl(tmp_path / "c.jsonl", rows), cfg).texts()
    assert group.key == "q" and [c.source for c in group.candidates] == ["m1", "m2"]
    with pytest.raises(GrapeError, match="--response-column nope: no such column; its columns are instruction, reply"):
        read(Path(tmp_path / "c.jsonl"), GrapeConfig(cache_dir=None, response_column="nope"))


def test_compressed_files(tmp_path):
    import bz2
    import gzip
    import lzma

    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "output": "hello"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "d.json.bz2").write_bytes(bz2.compress(json.dumps(rows).encode()))
    (tmp_path / "d.csv.xz").write_bytes(lzma.compress(b"instruction,output\nSay hi,hi\nSay hi,hello\n"))
    for name in ("d.jsonl.gz", "d.json.bz2", "d.csv.xz"):
        (group,) = read(tmp_path / name, CFG).texts()
        assert [c.response for c in group.candidates] == ["hi", "hello"]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(text.encode() + b'{"instruction": \n'))
    with pytest.raises(GrapeError, match=r"bad.jsonl.gz: line 3: not valid JSON"):
        read(tmp_path / "bad.jsonl.gz", CFG)


def test_zstandard_files_need_the_package(tmp_path):
    import importlib.util

    path = tmp_path / "d.jsonl.zst"
    if importlib.util.find_spec("zstandard") is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(GrapeError, match=r"d.jsonl.zst: reading .zst files needs the zstandard package: pip "
                                             r"install zstandard"):  # fmt: skip
            read(path, CFG)
        return
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"instruction": "Q", "output": "a"}\n'))
    assert len(read(path, CFG).texts()) == 1


def test_records_under_a_top_level_key(tmp_path):
    records = [{"instruction": "Q", "output": "a"}, {"instruction": "Q", "output": "b"}]
    (tmp_path / "doc.json").write_text(json.dumps({"version": "1.0", "data": records}, indent=2))
    (group,) = read(tmp_path / "doc.json", CFG).texts()
    assert [c.response for c in group.candidates] == ["a", "b"]
    (tmp_path / "one.json").write_text(json.dumps({"messages": [{"role": "user", "content": "Q"},
                                                                {"role": "assistant", "content": "a"}]}))
    assert read(tmp_path / "one.json", CFG).format.name == "messages"  # a lone row of messages is a row
    (tmp_path / "two.json").write_text(json.dumps({"train": records, "test": records}))
    with pytest.raises(GrapeError, match=r"two.json: cannot tell .* if the file is one object holding lists of "
                                         r"records \(train, test\), keep one list per file"):  # fmt: skip
        read(tmp_path / "two.json", CFG)


def test_unknown_shapes_say_what_they_saw_and_what_reads_them(tmp_path):
    rows = [{"question_text": "Q", "replies": [{"text": "a", "by": "m1"}, {"text": "b", "by": "m2"}]}]
    with pytest.raises(GrapeError, match=r"its first row has question_text \(a string\), replies \(a list of "
                                         r"\{text, by\} objects\);.* --prompt-column question_text "
                                         r"--candidates-column replies"):  # fmt: skip
        read(write_jsonl(tmp_path / "u.jsonl", rows), CFG)
    (group,) = read(tmp_path / "u.jsonl", GrapeConfig(cache_dir=None, prompt_column="question_text",
                                                      candidates_column="replies", source_column="by")).texts()
    assert list(group.prompt) == [{"role": "user", "content": "Q"}] and [c.source for c in group.candidates] == ["m1", "m2"]
    turns = [{"conversation": [{"question": "Q", "reply": "a"}]}]
    for on_bad_row in ("error", "skip"):  # the data's shape, not a bad row: skipping cannot help
        with pytest.raises(GrapeError) as err:
            read(write_jsonl(tmp_path / "t.jsonl", turns), GrapeConfig(cache_dir=None, on_bad_row=on_bad_row))
        assert str(err.value).endswith("row 1: field 'conversation[0]': turns are {question, reply} objects; chat "
                                       "turns need role/content, from/value or input/output fields")


def test_prompt_context_and_system_columns(tmp_path):
    rows = [{"task": "Summarize.", "passage": "Cats sleep a lot.", "persona": "You are terse.", "reply": r}
            for r in ("Cats nap.", "They sleep.")]  # fmt: skip
    cfg = GrapeConfig(cache_dir=None, prompt_column="task", context_column="passage", system_column="persona",
                      response_column="reply")  # fmt: skip
    (group,) = read(write_jsonl(tmp_path / "d.jsonl", rows), cfg).texts()
    assert list(group.prompt) == [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Summarize.\nCats sleep a lot."}]
    pairs = [{"title": "Why is the sky blue?", "human_ref_A": "Scattering.", "human_ref_B": "Air."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    with pytest.raises(GrapeError, match=r"pairs.jsonl: no prompt column; .* \(or name it with --prompt-column\)"):
        read(path, CFG)
    (group,) = read(path, GrapeConfig(cache_dir=None, prompt_column="title")).texts()
    assert group.prompt[-1]["content"] == "Why is the sky blue?" and len(group.candidates) == 2


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ([{"message_id": "m1", "parent_id": None, "role": "prompter", "text": "Q"}], {"prompt_column": "text"},
         "--prompt-column text: the data reads as tree rows, which do not use it (they take --source-column)"),
        ([{"instruction": "Q", "output": "a"}], {"prompt_column": "title"},
         "--prompt-column title: no such column; its columns are instruction, output"),
        ([{"instruction": "Q", "output": "a"}], {"context_column": "passage"},
         "--context-column passage: no such column; its columns are instruction, output"),
        ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]}],
         {"prompt_column": "messages"}, "--prompt-column messages: the data reads as messages rows, which do not use "
                                        "it (they take --system-column, --source-column)"),
        ([{"instruction": "Q", "responses": ["a", "b"]}], {"candidates_column": "answers"},
         "--candidates-column answers: no such column; its columns are instruction, responses"),
        ([{"instruction": "Q", "responses": ["a", "b"]}], {"response_column": "text"},
         "--response-column text: no such column, nor a field of the candidates in 'responses' (they are strings)"),
        ([{"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}],
         {"prompt_column": "prompt"}, "--prompt-column prompt: the candidates carry their own conversation, which is "
                                      "the prompt; leave the option out"),
    ],
)
def test_column_options_are_checked(tmp_path, rows, options, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(GrapeError) as err:
        read(path, GrapeConfig(cache_dir=None, **options))
    assert str(err.value) == f"{path}: {message}"


def test_a_per_answer_source_column_names_every_answer_s(tmp_path):
    rows = [{"prompt": "Q", "response_0": "a", "response_1": "b", "prompt_source": "BeaverTails",
             "response_0_from": "m0", "response_1_from": "m1"}]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    (group,) = read(path, CFG).texts()
    assert [c.source for c in group.candidates] == ["response_0", "response_1"]
    (group,) = read(path, GrapeConfig(cache_dir=None, source_column="response_0_from")).texts()
    assert [c.source for c in group.candidates] == ["m0", "m1"]
    (group,) = read(path, GrapeConfig(cache_dir=None, source_column="prompt_source")).texts()
    assert [c.source for c in group.candidates] == ["BeaverTails", "BeaverTails"]
