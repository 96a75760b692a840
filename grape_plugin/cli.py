"""``grape-plugin``: preview and select GRAPE data, compare fit metrics, list plugins, export the embedded model."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from .config import GrapeConfig, load_config_file
from .errors import GrapeError

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
    parser.add_argument("data", help="JSON, JSONL, Parquet, CSV file or saved dataset folder")
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


def cmd_preview(args: argparse.Namespace) -> None:
    from .models import resolve_model
    from .pipeline import run
    from .report import preview_text

    cfg = build_config(args)
    if cfg.model is None:
        print(f"no --model given: scoring with the embedded SmolLM2-135M-Instruct ({resolve_model(None)})")
    _, selection = run(args.data, cfg, limit=args.limit)
    print(preview_text(selection))
    if args.html:
        from .report_html import write_html

        print(f"html report: {write_html(selection, args.html)}")


def cmd_select(args: argparse.Namespace) -> None:
    from .pipeline import run, write
    from .report import summary_text

    cfg = build_config(args)
    data, selection = run(args.data, cfg, limit=args.limit)
    paths = write(data, selection, args.output)
    print(summary_text(selection))
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    import json

    from .pipeline import run
    from .plugins import registry
    from .report import compare_metrics, compare_text

    cfg = build_config(args)
    metrics = args.metrics.split(",") if args.metrics else list(registry("metrics"))
    _, selection = run(args.data, cfg, limit=args.limit, token_scores=True)
    info = compare_metrics(selection, cfg, metrics)
    print(compare_text(info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2, ensure_ascii=False)
        print(f"json: {args.json}")


def cmd_plugins(args: argparse.Namespace) -> None:
    from .plugins import KINDS, load_plugins, registry

    pm = load_plugins()
    print("plugins: " + ", ".join(sorted(name for name, _ in pm.list_name_plugin())))
    for kind in KINDS:
        print(f"{kind}: {', '.join(registry(kind))}")


def cmd_export_model(args: argparse.Namespace) -> None:
    from .models import export_model

    print(f"wrote {export_model(args.model, args.output)}")


LF_HELP = """\
GRAPE for LLaMA-Factory. Turn selection on per dataset with a "grape" key in its dataset_info.json entry:

  "pooled_sft": {"file_name": "pooled.json", "formatting": "sharegpt", "columns": {"messages": "conversations"},
                 "grape": {"template": "train", "top_k": 1}}

  grape-plugin llamafactory train config.yaml [key=value ...]   select, then train (on every rank)
  grape-plugin llamafactory select config.yaml -o DIR           select only; then: llamafactory-cli train DIR/train.yaml

A plain llamafactory-cli train ignores the key. Options: grape_plugin/integrations/llamafactory/README.md."""
LF_TRAIN_HELP = """\
Train with LLaMA-Factory on the GRAPE selection: takes exactly llamafactory-cli train's arguments.
Datasets whose dataset_info.json entry has a "grape" key are scored with the run's model and template and
replaced by their selection; the others are used as they are. With several devices (or FORCE_TORCHRUN=1) it
re-launches itself under torchrun, like llamafactory-cli. See grape_plugin/integrations/llamafactory/README.md."""


def cmd_llamafactory_train(args: argparse.Namespace) -> None:
    if not args.args or args.args[0] in ("-h", "--help"):
        print(args.usage())
        return
    from .integrations.llamafactory import train

    code = train(args.args)
    if code:
        raise SystemExit(code)


def cmd_llamafactory_select(args: argparse.Namespace) -> None:
    from .integrations.llamafactory import select_offline

    command = select_offline([args.config, *args.overrides], args.output)
    print(f"selection written to {args.output}; train on it with:\n  {command}")


def add_llamafactory(sub: Any) -> None:
    lf = sub.add_parser(
        "llamafactory", help="LLaMA-Factory: train on the GRAPE selection of datasets with a grape key",
        description=LF_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    lf_sub = lf.add_subparsers(dest="lf_command", required=True)
    # '+' prefix: every argument, --flags included, goes to LLaMA-Factory unparsed
    train = lf_sub.add_parser(
        "train", prefix_chars="+", add_help=False, help="select, then train (llamafactory-cli train's arguments)",
        description=LF_TRAIN_HELP, usage="%(prog)s config.yaml [key=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.add_argument("args", nargs=argparse.REMAINDER, metavar="config.yaml [key=value ...]")
    train.set_defaults(func=cmd_llamafactory_train, usage=train.format_help)
    sel = lf_sub.add_parser("select", help="write the selection and its dataset_info.json for llamafactory-cli train")
    sel.add_argument("config", help="the training config (YAML or JSON)")
    sel.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as llamafactory-cli takes them")
    sel.add_argument("-o", "--output", required=True, help="folder for the selection (and a train.yaml using it)")
    sel.set_defaults(func=cmd_llamafactory_select)


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
    add_llamafactory(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except GrapeError as exc:
        print(f"grape-plugin: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
