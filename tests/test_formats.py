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
