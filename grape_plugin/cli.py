"""``grape-plugin``: preview and select GRAPE data, compare fit metrics, list plugins, export the embedded model."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from .config import GrapeConfig, load_config_file
from .errors import GrapeError
from .plugins import registry

def config_flag(name: str, field: FieldInfo) -> tuple[str, dict[str, Any]]:
    """The command-line flag of a ``GrapeConfig`` field: its type, choices, help and default come from the field."""
    kind = field.annotation
    if get_origin(kind) is Union:  # Optional[X]
        kind = next(a for a in get_args(kind) if a is not type(None))
    default = field.get_default(call_default_factory=True)
    shown = "" if default is None or default is False else f" (default: {default})"
    kwargs: dict[str, Any] = {"default": None, "help": f"{field.description}{shown}"}
    if kind is bool:  # an option that is on by default gets a --no- form too
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif get_origin(kind) is Literal:
        kwargs["choices"] = list(get_args(kind))
    elif kind in (int, float):
        kwargs["type"] = kind
    return "--" + name.replace("_", "-"), kwargs


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="JSON, JSONL, Parquet, CSV file, a folder of them, or a saved dataset folder")
    parser.add_argument("--config", help="YAML file with the same keys (a top-level grape: block is fine)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    for name, field in GrapeConfig.model_fields.items():
        flag, kwargs = config_flag(name, field)
        parser.add_argument(flag, dest=name, **kwargs)


def build_config(args: argparse.Namespace) -> GrapeConfig:
    """The config file's keys, overridden by the flags given on the command line."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values.update({n: getattr(args, n) for n in GrapeConfig.model_fields if getattr(args, n) is not None})
    if args.no_cache:
        values["cache_dir"] = None
    return GrapeConfig.from_mapping(values, where=args.config or "options")


def file_host(args: argparse.Namespace, out: Optional[str] = None) -> Any:
    """The data file of the command line as a host, its plugins resolved from the options."""
    from .components import Components
    from .files import FileHost, read

    return FileHost(read(args.data, Components.of(build_config(args)), limit=args.limit), out)


def cmd_preview(args: argparse.Namespace) -> None:
    from .host import select_from
    from .models import resolve_model
    from .report import preview_text

    host = file_host(args)
    if host.cfg.model is None:
        print(f"no --model given: scoring with the embedded SmolLM2-135M-Instruct ({resolve_model(None)})")
    selection = select_from(host)
    print(preview_text(selection))
    if args.html:
        from .report_html import write_html

        print(f"html report: {write_html(selection, args.html)}")


def cmd_select(args: argparse.Namespace) -> None:
    from .host import prepare

    prepared = prepare(file_host(args, args.output))
    if prepared.reused:
        print(f"reusing the selection in {prepared.folder}: same data, model and options "
              f"(delete {prepared.folder / 'selection.json'} to select again)")  # fmt: skip
    print(prepared.manifest["summary"])
    print(f"written to {prepared.folder}: " + ", ".join(sorted(p.name for p in prepared.folder.iterdir())))


def cmd_compare(args: argparse.Namespace) -> None:
    import json

    from .components import Components
    from .host import select_from
    from .report import compare_metrics, compare_text

    host = file_host(args)
    variants, skipped = {}, {}
    for name in args.metrics.split(",") if args.metrics else list(registry("metrics")):
        try:
            variants[name] = Components.of(host.cfg.model_copy(update={"metric": name}))
        except GrapeError as exc:
            skipped[name] = str(exc)
    selection = select_from(host, token_scores=True)
    info = compare_metrics(selection, variants, skipped)
    print(compare_text(info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2, ensure_ascii=False)
        print(f"json: {args.json}")


def cmd_plugins(args: argparse.Namespace) -> None:
    from .plugins import KINDS, load_plugins

    pm = load_plugins()
    print("plugins: " + ", ".join(sorted(name for name, _ in pm.list_name_plugin())))
    for kind in KINDS:
        print(f"{kind}: {', '.join(registry(kind))}")


def cmd_export_model(args: argparse.Namespace) -> None:
    from .models import export_model

    print(f"wrote {export_model(args.model, args.output)}")


def host_commands(name: str, title: str, doc: str, flows: str) -> Callable[[Any], None]:
    """The ``setup`` of ``grape-plugin NAME train|select`` for the training framework ``title``, described by ``doc``
    (for ``grape_register_commands``).

    ``flows`` names the module that runs them, imported only when one runs: its ``train(argv) -> int`` selects, then
    trains, taking the framework's own ``train`` arguments unparsed; its ``select(argv, out) -> str`` writes the
    selection to ``out`` and returns the command that trains on it.
    """

    def train(args: argparse.Namespace) -> int:
        if not args.args or args.args[0] in ("-h", "--help"):
            print(args.usage())
            return 0
        return import_module(flows).train(args.args)

    def select(args: argparse.Namespace) -> None:
        command = import_module(flows).select([args.config, *args.overrides], args.output)
        print(f"selection written to {args.output}; train on it with:\n  {command}")

    def setup(sub: Any) -> None:
        raw = argparse.RawDescriptionHelpFormatter
        host = sub.add_parser(name, help=f"{title}: train on the GRAPE selection of the run's data", description=doc,
                              formatter_class=raw)  # fmt: skip
        commands = host.add_subparsers(required=True)
        # '+' prefix: every argument, --flags included, goes to the framework unparsed
        run = commands.add_parser("train", prefix_chars="+", add_help=False, description=doc, formatter_class=raw,
                                  help=f"select, then train ({title}'s own train arguments, torchrun included)",
                                  usage="%(prog)s config.yaml [key=value ...]")  # fmt: skip
        run.add_argument("args", nargs=argparse.REMAINDER, metavar="config.yaml [key=value ...]")
        run.set_defaults(func=train, usage=run.format_help)
        sel = commands.add_parser("select", help=f"write the selection for {title}'s own CLI to train on")
        sel.add_argument("config", help="the training config (YAML or JSON)")
        sel.add_argument("overrides", nargs="*", metavar="key=value", help=f"overrides, as {title}'s CLI takes them")
        sel.add_argument("-o", "--output", required=True, help="folder for the selection (and a config using it)")
        sel.set_defaults(func=select)

    return setup


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grape-plugin", description="GRAPE: keep the responses your base model fits best.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preview", help="score a sample and show every candidate and the winner")
    add_options(pre)
    pre.add_argument("--limit", type=int, default=20, help="instructions to score (default 20)")
    pre.add_argument("--html", metavar="PATH", help="also write the report with charts and a searchable table here")
    pre.set_defaults(func=cmd_preview)
    sel = sub.add_parser("select", help="write the selected dataset, a scores table and a report")
    add_options(sel)
    sel.add_argument("-o", "--output", required=True, help="output folder")
    sel.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    sel.set_defaults(func=cmd_select)
    cmp = sub.add_parser("compare", help="select with several metrics from one scoring run and compare the picks")
    add_options(cmp)
    cmp.add_argument("--metrics", help="comma-separated metric names (default: every registered metric)")
    cmp.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    cmp.add_argument("--json", metavar="PATH", help="also write the comparison as JSON here")
    cmp.set_defaults(func=cmd_compare)
    plug = sub.add_parser("plugins", help="list the registered formats, renderers, scorers, selectors and metrics")
    plug.set_defaults(func=cmd_plugins)
    exp = sub.add_parser("export-model", help="save a model (default: the embedded SmolLM2) as a plain folder")
    exp.add_argument("output", help="folder to write")
    exp.add_argument("--model", default=None, help="model to export (default: the embedded SmolLM2)")
    exp.set_defaults(func=cmd_export_model)
    for setup in registry("commands").values():
        setup(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os

    if not sys.stderr.isatty():  # progress bars are for terminals, not logs
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parser().parse_args(argv)
    return logged(lambda: args.func(args), args.verbose)


def logged(command: Callable[[], Optional[int]], verbose: bool = False) -> int:
    """A command-line entry (``main``, a host's torchrun rank): logging to stderr, INFO with ``verbose`` (a host's
    logger may say more), and the command's exit code (``guarded``)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return guarded(command)


def guarded(command: Callable[[], Optional[int]]) -> int:
    """A command's exit code; a ``GrapeError`` ends it with its one-line message and code 2, never a traceback."""
    try:
        return command() or 0
    except GrapeError as exc:
        print(f"grape-plugin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
