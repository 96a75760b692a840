"""\
GRAPE for LLaMA-Factory: the datasets whose dataset_info.json entry has a "grape" key (e.g. "grape": {"top_k": 1})
are replaced by their GRAPE selection, scored with the run's model and template; a plain llamafactory-cli ignores it.
  train config.yaml [key=value ...]   select, then train (llamafactory-cli train's arguments, torchrun included)
  select config.yaml -o DIR           select only; then: llamafactory-cli train DIR/train.yaml
Options: grape_plugin/integrations/llamafactory/README.md."""

import argparse
from typing import Any, Callable

from grape_plugin.hookspecs import hookimpl


def cmd_llamafactory_train(args: argparse.Namespace) -> int:
    from .host import train

    if not args.args or args.args[0] in ("-h", "--help"):
        print(args.usage())
        return 0
    return train(args.args)


def cmd_llamafactory_select(args: argparse.Namespace) -> None:
    from .host import select

    command = select([args.config, *args.overrides], args.output)
    print(f"selection written to {args.output}; train on it with:\n  {command}")


def add_commands(sub: Any) -> None:
    """``grape-plugin llamafactory train|select``."""
    lf = sub.add_parser(
        "llamafactory", help="LLaMA-Factory: train on the GRAPE selection of datasets with a grape key",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    lf_sub = lf.add_subparsers(dest="lf_command", required=True)
    # '+' prefix: every argument, --flags included, goes to LLaMA-Factory unparsed
    train = lf_sub.add_parser(
        "train", prefix_chars="+", add_help=False, help="select, then train (llamafactory-cli train's arguments)",
        description=__doc__, usage="%(prog)s config.yaml [key=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.add_argument("args", nargs=argparse.REMAINDER, metavar="config.yaml [key=value ...]")
    train.set_defaults(func=cmd_llamafactory_train, usage=train.format_help)
    sel = lf_sub.add_parser("select", help="write the selection and its dataset_info.json for llamafactory-cli train")
    sel.add_argument("config", help="the training config (YAML or JSON)")
    sel.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as llamafactory-cli takes them")
    sel.add_argument("-o", "--output", required=True, help="folder for the selection (and a train.yaml using it)")
    sel.set_defaults(func=cmd_llamafactory_select)


@hookimpl
def grape_register_commands(register: Callable[[str, Callable[[Any], None]], None]) -> None:
    """``grape-plugin llamafactory train|select`` (``host.train``, ``host.select``): this module is a ``grape_plugin``
    entry point, so that the core's CLI imports no host integration and LLaMA-Factory loads only when a command runs."""
    register("llamafactory", add_commands)
