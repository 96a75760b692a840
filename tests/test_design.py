"""Properties of the code itself: no import cycles, one place for options, stages that return new values."""

from __future__ import annotations

import ast
import copy

import pytest

from tests.helpers import ROOT, registered, write_jsonl

from grape_plugin import GrapeConfig, read, run, run_groups
from grape_plugin.cli import parser


def module_imports() -> dict[str, set[str]]:
    """Every grape_plugin module (integrations included) and the package modules it imports, at any depth."""
    graph: dict[str, set[str]] = {}
    folder = ROOT / "grape_plugin"
    for path in folder.rglob("*.py"):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(["grape_plugin", *parts[:-1]] if is_pkg else ["grape_plugin", *parts])
        package = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module  # fmt: skip
                found |= {target, *(f"{target}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    # importing a submodule runs its parent packages first anyway: edges to ancestors are not cycles
    return {m: {t for t in targets if t in graph and t != m and not m.startswith(t + ".")} for m, targets in graph.items()}


def test_no_import_cycles():
    graph = module_imports()
    assert "grape_plugin.records" in graph and "grape_plugin.integrations.axolotl.host" in graph

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module])


def test_every_option_is_a_flag_with_the_fields_help():
    sub = parser()._subparsers._group_actions[0].choices["select"]  # type: ignore[union-attr]
    actions = {a.dest: a for a in sub._actions}
    for name, field in GrapeConfig.model_fields.items():
        assert name in actions, f"GrapeConfig.{name} has no flag"
        assert actions[name].help.startswith(field.description)
    assert actions["dtype"].choices == ["auto", "fp32", "bf16", "fp16"] and actions["top_k"].type is int


def test_stages_return_new_values_and_leave_their_inputs_alone(tmp_path, tiny_model):
    rows = [{"id": "a", "instruction": "Say hi", "output": "hi"}, {"id": "a", "instruction": "Say hi", "output": "hello " * 200},
            {"id": "b", "instruction": "Write", "output": "word " * 200}, {"id": "b", "instruction": "Write", "output": "text"}]
    data = read(write_jsonl(tmp_path / "long.jsonl", rows), GrapeConfig(cache_dir=None))
    before = copy.deepcopy(data.grouped)
    cfg = GrapeConfig(model=str(tiny_model), cache_dir=None, max_length=64)
    selection = run_groups(data.grouped, cfg)
    assert data.grouped == before and [len(g.candidates) for g in data.groups] == [2, 2]
    assert [len(g.candidates) for g in selection.groups] == [1, 1]


def test_truncated_candidates_are_kept_not_dropped(tmp_path, tiny_model):
    rows = [{"id": "a", "instruction": "Say hi", "output": "hello " * 200}, {"id": "a", "instruction": "Say hi", "output": "hi"}]
    data = read(write_jsonl(tmp_path / "t.jsonl", rows), GrapeConfig(cache_dir=None))
    cfg = GrapeConfig(model=str(tiny_model), cache_dir=None, max_length=64, over_length="truncate")
    selection = run_groups(data.grouped, cfg)
    assert selection.stats.truncated == 1 and selection.drops.as_dict() == {
        "candidates": {"not_selected": 1}, "instructions": {}, "rows": {}}
    assert len(selection.groups[0].candidates) == 2


def test_no_core_module_imports_a_host_integration():
    wings = "grape_plugin.integrations"
    for module, targets in module_imports().items():
        if not module.startswith(wings):
            assert not [t for t in targets if t.startswith(wings)], f"{module} imports a host integration"


def test_a_host_integration_sees_the_core_through_grape_plugin_host():
    """Wings use the host API (and the hook marker, and the CLI's error guard), never the core's other modules."""
    wings, allowed = "grape_plugin.integrations", {"grape_plugin.host", "grape_plugin.hookspecs", "grape_plugin.cli"}
    for module, targets in module_imports().items():
        if module.startswith(wings):
            core = {t for t in targets if t.startswith("grape_plugin.") and not t.startswith(wings)}
            assert core <= allowed, f"{module} imports {sorted(core - allowed)}"


def test_no_function_takes_more_than_six_parameters():
    for path in (ROOT / "grape_plugin").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
                assert len(names) <= 6, f"{path.name}:{node.lineno} {node.name} takes {len(names)} parameters"


def test_no_plugin_is_looked_up_once_a_run_has_started(pool_file, tiny_model, monkeypatch):
    from grape_plugin import Components, plugins

    parts = Components.of(GrapeConfig(model=str(tiny_model), cache_dir=None, metric="min_k", strategy="worst"))
    data = read(pool_file, parts)
    monkeypatch.setattr(plugins, "registry", lambda kind: pytest.fail(f"{kind} looked up during the run"))
    selection = run_groups(data.grouped, parts)
    assert selection.kept and selection.metric == "min_k"


def test_a_scorer_without_the_optional_members_runs(pool_file, tiny_model, tmp_path):
    """A third-party scorer with only what the Scorer protocol requires (no context_length, loaded, about, close)."""
    from transformers import AutoTokenizer

    from grape_plugin import Score, hookimpl

    class Bare:
        def __init__(self, cfg):
            self.tokenizer, self.identity = AutoTokenizer.from_pretrained(str(tiny_model)), "bare"

        def score(self, items, progress=None):
            return [Score(-float(i.n_tokens), i.n_tokens) for i in items]  # every token at log-prob -1

    class Plugin:
        @hookimpl
        def grape_register_scorers(self, register):
            register("bare", Bare)

    with registered(Plugin(), "bare-scorer"):
        data, selection = run(pool_file, GrapeConfig(scorer="bare", cache_dir=None))
    assert all(s.mean == -1.0 for s in selection.scores.values()) and len(selection.kept) == len(data.groups)
    assert selection.stats.model_loaded is None and selection.made_by["model"]["identity"] == "bare"


def test_a_plugin_missing_a_required_member_is_one_clear_line():
    from grape_plugin import Components, GrapeError, hookimpl

    class NoScore:
        def __init__(self, cfg):
            self.tokenizer, self.identity = None, "x"

    class Plugin:
        @hookimpl
        def grape_register_scorers(self, register):
            register("noscore", NoScore)

    with registered(Plugin(), "noscore-scorer"), pytest.raises(GrapeError, match="plugin 'noscore': NoScore has "
                                                                "no 'score', which the Scorer protocol"):  # fmt: skip
        Components.of(GrapeConfig(scorer="noscore", cache_dir=None)).make_scorer()
