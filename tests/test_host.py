"""What the core gives every host: its GRAPE block's options, datasets selected together, an input's row cap, reading
a folder of data files, and the ``train|select`` commands of a training framework."""

from __future__ import annotations

import sys
import types

import pytest

from tests.helpers import pool_rows, registered, write_jsonl

from grape_plugin import GrapeConfig, GrapeError, hookimpl
from grape_plugin.cli import host_commands, main
from grape_plugin.datafiles import write_dataset
from grape_plugin.host import BaseHost, Components, Context, Input, detect_format, read_dataset, select_from

HINTS = {"split": "set split: on the datasets: entry"}


def test_a_block_reads_over_the_runs_defaults_and_refuses_what_the_run_decides():
    assert BaseHost.options(None, {}, "grape", HINTS) is None and BaseHost.options(False, {}, "grape", HINTS) is None
    cfg = BaseHost.options(True, {"max_length": 512}, "grape", HINTS)
    assert (cfg.template, cfg.max_length) == ("train", 512)
    with pytest.raises(GrapeError, match="^grape: 'split' cannot be set here: set split: on the datasets: entry$"):
        BaseHost.options({"split": "test"}, {}, "grape", HINTS)
    with pytest.raises(GrapeError, match="^grape: 'model' cannot be set here: the scoring model is the model"):
        BaseHost.options({"model": "gpt2"}, {}, "grape", HINTS)


def test_max_length_over_the_runs_own_limit_is_refused():
    limit, defaults = ("sequence_len", 512), {"max_length": 512}
    assert BaseHost.options({"max_length": 256}, defaults, "grape", HINTS, limit).max_length == 256
    assert BaseHost.options({}, defaults, "grape", HINTS, ("sequence_len", None)).max_length == 512
    with pytest.raises(GrapeError, match=r"^grape: max_length 1024 exceeds the run's sequence_len 512; the run would "
                                         r"cut longer winners \(lower max_length, or raise sequence_len\)$"):
        BaseHost.options({"max_length": 1024}, defaults, "grape", HINTS, limit)


def test_datasets_selected_together_differ_only_in_how_each_reads():
    first = GrapeConfig(cache_dir=None)
    reading = first.model_copy(update={"source_column": "model", "group_by": "prompt", "on_bad_row": "skip"})
    assert BaseHost.shared_options({"a": first, "b": reading}, "info.json") is first
    with pytest.raises(GrapeError, match=r"^info.json: datasets 'a' and 'c' are selected together .* differ in "
                                         r"'top_k' \(1 vs 2\); make them equal$"):
        BaseHost.shared_options({"a": first, "b": reading, "c": first.model_copy(update={"top_k": 2})}, "info.json")


class TwoFiles(BaseHost):
    """A host of two data files, the first read and kept up to ``limit`` (a host's ``max_samples``)."""

    def __init__(self, parts: Components, paths: list, limit: int):
        super().__init__(parts)
        self.inputs = [self.input(path, n) for path, n in zip(paths, (limit, None))]

    def input(self, path, limit):
        rows = read_dataset(path)
        ctx = Context(str(path), list(rows.column_names), self.cfg)
        return Input(rows, detect_format(ctx, self.parts.formats, rows), ctx, limit)


def test_an_inputs_limit_caps_its_kept_rows_by_whole_instructions(tmp_path, tiny_model):
    rows = pool_rows(8)
    paths = [write_jsonl(tmp_path / f"{n}.jsonl", [r for r in rows if int(r["id"][3:]) % 2 == n]) for n in (0, 1)]
    parts = Components.of(GrapeConfig(model=str(tiny_model), cache_dir=None, top_k=2))
    selection = select_from(TwoFiles(parts, paths, limit=3))
    kept = [c.part for _, c in selection.picks()]
    # the first file: 3 instructions read, 2 rows kept of each; a second would make 4 rows > 3, so it goes whole
    assert kept.count(0) == 2 and kept.count(1) == 8  # the second file: no limit, its 4 instructions kept
    assert selection.drops.as_dict()["instructions"]["over_max_samples"] == 2
    assert selection.drops.as_dict()["candidates"]["over_max_samples"] == 4


def test_a_hosts_selection_key_covers_its_inputs_rows(tmp_path, tiny_model):
    rows = pool_rows(4)
    paths = [write_jsonl(tmp_path / f"{n}.jsonl", rows[n * 16 : n * 16 + 16]) for n in (0, 1)]
    parts = Components.of(GrapeConfig(model=str(tiny_model), cache_dir=None))
    first = TwoFiles(parts, paths, limit=3).key_parts()
    assert TwoFiles(parts, paths, limit=3).key_parts() == first
    write_jsonl(paths[1], rows[16:24])
    assert TwoFiles(parts, paths, limit=3).key_parts() != first


def test_a_folder_of_data_files_reads_as_one_dataset(tmp_path):
    rows = pool_rows(2)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", rows[8:])
    write_jsonl(folder / "a.jsonl", rows[:8])
    (folder / ".hidden").write_text("not data")
    assert [r["id"] for r in read_dataset(folder)] == [r["id"] for r in rows]  # in name order
    assert write_dataset(read_dataset(folder), tmp_path, "selected", folder).name == "selected.jsonl"  # like a.jsonl
    (folder / "notes.txt").write_text("not data either")
    with pytest.raises(GrapeError, match="notes.txt: unsupported file type"):
        read_dataset(folder)
    (folder / "notes.txt").unlink()
    (folder / "more").mkdir()
    with pytest.raises(GrapeError, match="shards: expected a folder of data files only, or a saved Hugging Face"):
        read_dataset(folder)


class ToyCommands:
    @hookimpl
    def grape_register_commands(self, register):
        register("toy", host_commands("toy", "Toy", "Toy docs", "toy_flows"))


def test_a_frameworks_commands_run_its_flows(monkeypatch, capsys):
    calls = []
    flows = types.ModuleType("toy_flows")
    flows.train = lambda argv: calls.append(("train", argv)) or 3
    flows.select = lambda argv, out: calls.append(("select", argv, out)) or f"toy train {out}/train.yaml"
    monkeypatch.setitem(sys.modules, "toy_flows", flows)  # imported only when a command runs
    with registered(ToyCommands(), "toy-commands"):
        assert main(["toy", "train", "run.yaml", "--lr", "1e-5"]) == 3  # flags go to the framework unparsed
        assert main(["toy", "select", "run.yaml", "epochs=1", "-o", "out"]) == 0
        assert "train on it with:\n  toy train out/train.yaml" in capsys.readouterr().out
        assert main(["toy", "train"]) == 0 and "Toy docs" in capsys.readouterr().out  # usage, no training
    assert calls == [("train", ["run.yaml", "--lr", "1e-5"]), ("select", ["run.yaml", "epochs=1"], "out")]
