"""The CLI end to end on a tiny model: outputs, cache, config files, plugins, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.helpers import registered, write_jsonl

from grape_plugin import __version__
from grape_plugin.cli import main


def grape(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grape_plugin.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def fails(capsys):
    """Run the CLI in this process; return its exit code and its stderr, which must hold no traceback."""

    def call(*args: str) -> tuple[int, str]:
        code = main(list(args))
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) >= 1
        return code, err

    return call


@pytest.fixture()
def selected(tmp_path, tiny_model, pool_file):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(out), "--cache-dir", str(cache)]) == 0
    return out, cache


def test_select_writes_selection_scores_and_report(selected, pool_file):
    out, _ = selected
    scores = read_jsonl(out / "scores.jsonl")
    rows = read_jsonl(out / "selected.jsonl")
    source_rows = read_jsonl(pool_file)
    report = json.loads((out / "report.json").read_text())
    assert len(scores) == len(source_rows) - report["dropped"]["candidates"].get("duplicate_response", 0)
    assert len(rows) == 6 and set(rows[0]) == set(source_rows[0])  # same shape as the input
    for group in {s["group"] for s in scores}:
        cands = [s for s in scores if s["group"] == group]
        winner = max(cands, key=lambda s: s["score"])
        assert [s["index"] for s in cands if s["selected"]] == [winner["index"]]
        assert source_rows[winner["row"]] in rows
    assert report["instructions_kept"] == 6 and report["scored"] == len(scores) and report["cached"] == 0
    assert sum(report["wins_per_source"].values()) == 6


def test_second_run_scores_nothing(selected, tiny_model, pool_file, tmp_path):
    _, cache = selected
    out2 = tmp_path / "out2"
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(out2), "--cache-dir", str(cache), "--top-k", "2", "--budget", "3"]) == 0
    report = json.loads((out2 / "report.json").read_text())
    assert report["scored"] == 0 and report["cached"] > 0
    assert report["instructions_kept"] == 3 and report["candidates_kept"] == 6


def test_corrupt_cache_is_rebuilt(selected, tiny_model, pool_file, tmp_path):
    _, cache = selected
    (part,) = cache.glob("*/*.grs")
    part.write_bytes(part.read_bytes()[:10])  # truncated mid-header: nothing in it is trusted
    out3 = tmp_path / "out3"
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(out3), "--cache-dir", str(cache)]) == 0
    assert json.loads((out3 / "report.json").read_text())["cached"] == 0
    assert (out3 / "selected.jsonl").read_text() == (selected[0] / "selected.jsonl").read_text()


def test_preview_shows_candidates_and_winner(tiny_model, pool_file, capsys):
    assert main(["preview", str(pool_file), "--model", str(tiny_model), "--limit", "2", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "[ae-000]" in out and "[ae-002]" not in out
    assert out.count("\n  * ") == 2 and "gpt-4o-2024-05-13" in out
    assert "wins per source:" in out and "instructions: 2 read, 2 kept" in out


def test_config_file_and_unknown_keys(tmp_path, tiny_model, pool_file, fails):
    good = tmp_path / "good.yaml"
    good.write_text(f"grape:\n  model: {tiny_model}\n  top_k: 2\n  cache_dir: null\n")
    assert main(["select", str(pool_file), "--config", str(good), "-o", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["candidates_kept"] == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("top_kk: 2\n")
    code, err = fails("select", str(pool_file), "--config", str(bad), "-o", str(tmp_path / "o2"))
    assert code == 2 and "unknown key 'top_kk'; expected one of:" in err and "top_k" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or folder"),
        (["--model", "EMPTY"], "the folder has no config.json; expected a transformers model folder"),
        (["--template", "nope"], "template 'nope' is not one of paper, chat"),
    ],
)
def test_cli_errors_are_one_clear_line(pool_file, tiny_model, args, message, tmp_path, fails):
    (tmp_path / "EMPTY").mkdir()
    argv = ["preview", str(pool_file), "--no-cache", "--limit", "1"]
    if "--model" not in args:
        argv += ["--model", str(tiny_model)]
    args = [str(tmp_path / a) if a == "EMPTY" else a for a in args]
    code, err = fails(*argv, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_row_via_cli(tmp_path, fails):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "a"}, {"instruction": "x", "output": " "}])
    code, err = fails("preview", str(path), "--model", "unused")
    assert code == 2 and f"{path}: row 2: field 'output': is empty" in err


def test_column_options_reach_the_reader_and_are_checked(tmp_path, tiny_model, fails, capsys):
    rows = [{"instruction": "Define entropy.", "generations": ["Disorder.", "Heat over temperature."],
             "generation_models": ["zephyr-7b", "mistral-7b"]}, {"instruction": "Say hi.", "generations": ["Hi."],
             "generation_models": ["zephyr-7b"]}]  # fmt: skip
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    code, err = fails("preview", str(path), "--model", "unused", "--source-column", "no_such_column")
    assert code == 2 and f"{path}: --source-column no_such_column: no such column, nor a field of the candidates" in err
    code, err = fails("preview", str(path), "--model", "unused", "--prompt-column", "title")
    assert code == 2 and f"{path}: --prompt-column title: no such column; its columns are instruction, " in err
    args = ["select", str(path), "--model", str(tiny_model), "--no-cache", "-o", str(tmp_path / "o")]
    assert main([*args, "--candidates-column", "generations", "--source-column", "generation_models"]) == 0
    out = capsys.readouterr().out
    assert f"read {path}: list rows; prompt: instruction, candidates: generations, source: generation_models" in out
    assert "single-candidate instructions: 1 (kept, nothing to compare: not counted as wins)" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(report["wins_per_source"]) <= {"zephyr-7b", "mistral-7b"} and sum(report["wins_per_source"].values()) == 1


def test_chat_row_that_opens_with_the_assistant_is_refused(tmp_path, tiny_model, fails):
    rows = [{"messages": [{"role": "assistant", "content": "Hello!"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, err = fails("select", str(path), "--model", str(tiny_model), "--no-cache", "-o", str(tmp_path / "o"))
    assert code == 2 and "row 1: field 'messages': the assistant turn to score has no user turn before it" in err


def test_output_folder_holding_the_input_is_refused(pool_file, tiny_model):
    before = pool_file.read_bytes()
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(pool_file.parent), "--no-cache"]) == 2
    assert pool_file.read_bytes() == before


def test_throwaway_plugin_is_used_from_the_cli(tmp_path, tiny_model, pool_file):
    from grape_plugin import hookimpl
    from grape_plugin.selection import Selector

    class Longest:
        @hookimpl
        def grape_register_selectors(self, register):
            # ignores scores: keeps the longest response, to show the plugin really ran
            register("longest", Selector(lambda scores, k, key, seed: [len(scores) - 1]))

    out = tmp_path / "o"
    with registered(Longest(), "throwaway"):
        assert main(["select", str(pool_file), "--model", str(tiny_model), "--strategy", "longest", "-o", str(out), "--no-cache"]) == 0
    scores = read_jsonl(out / "scores.jsonl")
    for group in {s["group"] for s in scores}:
        cands = [s for s in scores if s["group"] == group]
        assert [s["selected"] for s in cands] == [False] * (len(cands) - 1) + [True]


def test_entry_point_plugin_is_discovered(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "grape_extra").mkdir(parents=True)
    (pkg / "grape_extra" / "__init__.py").write_text(textwrap.dedent("""
        from grape_plugin import hookimpl
        from grape_plugin.selection import Selector

        @hookimpl
        def grape_register_selectors(register):
            register("first", Selector(lambda scores, k, key, seed: [0]))
    """))
    dist = pkg / "grape_extra-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: grape-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[grape_plugin]\nextra = grape_extra\n")
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    result = grape("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert "selectors: best, worst, random, first" in result.stdout and "extra" in result.stdout


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_remote_code_runs_only_when_asked(pool_file, tiny_model, monkeypatch, flag, expected):
    """The flag reaches every from_pretrained call that could run the model's code."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assert main(["preview", str(pool_file), "--model", str(tiny_model), "--limit", "1", "--no-cache", *flag]) == 0
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(value is expected for _, value in seen)


def test_a_fully_cached_rerun_loads_no_weights(selected, tiny_model, pool_file, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded on a fully cached run")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    _, cache = selected
    out = tmp_path / "again"
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(out), "--cache-dir", str(cache), "--top-k", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 0 and report["model_loaded"] is False
    # what made the selection is said for a cached run too
    made = report["made_by"]
    assert made["model"]["name"] == str(tiny_model) and made["model"]["dtype"] == "float32"
    assert made["template"] == "paper" and made["metric"] == "mean" and made["options"]["top_k"] == 2
    assert made["grape_plugin"] == __version__ and str(tiny_model) in (out / "report.html").read_text()


def test_select_into_the_same_folder_reuses_the_selection_until_an_option_changes(selected, tiny_model, pool_file, capsys):
    out, cache = selected
    capsys.readouterr()
    argv = ["select", str(pool_file), "--model", str(tiny_model), "-o", str(out), "--cache-dir", str(cache)]
    assert main(argv) == 0
    assert f"reusing the selection in {out}" in capsys.readouterr().out
    assert main([*argv, "--strategy", "worst"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["made_by"]["strategy"] == "worst"
    assert json.loads((out / "selection.json").read_text())["inputs"]["options"]["strategy"] == "worst"
