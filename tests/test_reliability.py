"""Crashes and restarts, determinism, and bad input that must never become a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from tests.helpers import pool_rows, write_jsonl

from grape_plugin import GrapeConfig, GrapeError, read, run
from grape_plugin.cache import records
from grape_plugin.cli import main


def kept_sources(selection) -> dict[str, list[str]]:
    """Kept candidates by group and source: independent of row order and candidate numbering."""
    return {g.key: sorted(g.candidates[i].source for i in selection.kept[g.key]) for g in selection.groups}


def test_kill_9_during_scoring_then_resume(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pool.jsonl", pool_rows(40))
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "grape_plugin.cli", "select", str(data), "--model", str(tiny_model),
            "--cache-dir", str(cache), "--batch-tokens", "256", "-o", str(tmp_path / "killed")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed, deadline = 0, time.time() + 240
    while committed == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        committed = sum(1 for part in cache.glob("*/*.grs") for _ in records(part))
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "report.json").exists()

    resumed = tmp_path / "resumed"
    assert main(["select", str(data), "--model", str(tiny_model), "--cache-dir", str(cache), "-o", str(resumed)]) == 0
    report = json.loads((resumed / "report.json").read_text())
    assert report["cached"] >= committed > 0 and report["scored"] == 320 - report["dropped"][
        "candidates"].get("duplicate_response", 0) - report["cached"]
    fresh = tmp_path / "fresh"
    assert main(["select", str(data), "--model", str(tiny_model), "--no-cache", "-o", str(fresh)]) == 0
    assert (resumed / "selected.jsonl").read_text() == (fresh / "selected.jsonl").read_text()


def test_same_selection_for_any_batch_size_and_row_order(tmp_path, tiny_model, pool_file):
    rows = [json.loads(line) for line in pool_file.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows)
    base = kept_sources(run(pool_file, GrapeConfig(model=str(tiny_model), cache_dir=None))[1])
    small = run(pool_file, GrapeConfig(model=str(tiny_model), cache_dir=None, batch_tokens=128))[1]
    assert kept_sources(small) == base
    assert kept_sources(run(shuffled, GrapeConfig(model=str(tiny_model), cache_dir=None))[1]) == base


def test_input_files_are_never_written(tmp_path, tiny_model, pool_file):
    before = hashlib.sha256(pool_file.read_bytes()).hexdigest(), pool_file.stat().st_mtime_ns
    assert main(["select", str(pool_file), "--model", str(tiny_model), "--no-cache", "-o", str(tmp_path / "o")]) == 0
    assert (hashlib.sha256(pool_file.read_bytes()).hexdigest(), pool_file.stat().st_mtime_ns) == before


def test_too_long_responses_and_emptied_instructions_are_counted(tmp_path, tiny_model):
    rows = [{"id": "a", "instruction": "Say hi", "output": "hi"}, {"id": "a", "instruction": "Say hi", "output": "hello " * 200},
            {"id": "b", "instruction": "Write", "output": "word " * 200}, {"id": "b", "instruction": "Write", "output": "text " * 200}]
    _, sel = run(write_jsonl(tmp_path / "long.jsonl", rows), GrapeConfig(model=str(tiny_model), cache_dir=None, max_length=64))
    assert sel.kept == {"a": (0,)}
    assert sel.drops.candidates["too_long"] == 3 and sel.drops.instructions["all_candidates_too_long"] == 1


def test_a_rerun_renders_nothing_and_counts_the_same_drops_and_cuts(tmp_path, tiny_model, monkeypatch):
    import grape_plugin.pipeline as pipeline

    rows = [{"id": "a", "instruction": "Say hi", "output": "hi"}, {"id": "a", "instruction": "Say hi", "output": "hello " * 200},
            {"id": "b", "instruction": "Write", "output": "word " * 200}, {"id": "b", "instruction": "Write", "output": "text " * 200},
            {"id": "c", "instruction": "Greet", "output": "hey"}, {"id": "c", "instruction": "Greet", "output": "good day"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    rendered, real = [], pipeline.render_groups
    monkeypatch.setattr(pipeline, "render_groups", lambda groups, *a: rendered.extend(groups) or real(groups, *a))
    for policy in ("drop", "truncate"):
        cfg = GrapeConfig(model=str(tiny_model), cache_dir=tmp_path / "cache", max_length=64, over_length=policy)
        _, first = run(path, cfg)
        assert len(rendered) == 3 and first.stats.scored > 0
        rendered.clear()
        _, again = run(path, cfg)
        assert not rendered and again.stats.scored == 0 and again.stats.cached == first.stats.scored
        assert (again.kept, again.drops, again.stats.truncated, again.stats.tokens) == (
            first.kept, first.drops, first.stats.truncated, first.stats.tokens)
        assert (again.stats.truncated, again.drops.candidates.get("too_long")) == ((3, None) if policy == "truncate" else (0, 3))


def test_tokenizer_without_pad_token_scores_padded_batches(tiny_model, pool_file):
    from grape_plugin.models import load_model

    assert load_model(str(tiny_model), device="cpu").tokenizer.pad_token is None
    _, sel = run(pool_file, GrapeConfig(model=str(tiny_model), cache_dir=None, batch_tokens=100_000))
    assert len(sel.scores) == sum(len(g.candidates) for g in sel.groups) > 40


def test_mixed_shapes_name_the_row(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"instruction": "q", "output": "b"}]
    with pytest.raises(GrapeError, match=r"mixed.jsonl: row 2: field 'messages': must be a non-empty list"):
        read(write_jsonl(tmp_path / "mixed.jsonl", rows), GrapeConfig(cache_dir=None))


def test_names_from_configs_cannot_escape_the_output_folder(tmp_path):
    from grape_plugin.datafiles import safe_filename

    assert safe_filename("pooled_sft", ".jsonl") == "pooled_sft.jsonl"
    for name in ("../../etc/passwd", "/abs/path", "..", "a/b", "con\x00x"):
        made = tmp_path / safe_filename(name, ".jsonl")
        assert made.parent == tmp_path and made.resolve().is_relative_to(tmp_path.resolve())
    assert safe_filename("a/b") != safe_filename("a_b")  # no collision with a name that was already safe


def test_a_published_folder_is_whole_or_absent(tmp_path):
    from grape_plugin.datafiles import publish_folder

    target = tmp_path / "selection"

    def broken(staging):
        (staging / "half.jsonl").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        publish_folder(target, broken)
    assert not target.exists()
    publish_folder(target, lambda staging: (staging / "done").write_text("first"))
    publish_folder(target, lambda staging: (staging / "done").write_text("second"))  # lost the race: dropped
    assert (target / "done").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["selection"]  # no staging copy is left behind
