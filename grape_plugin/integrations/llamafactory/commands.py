"""\
GRAPE for LLaMA-Factory: the datasets whose dataset_info.json entry has a "grape" key (e.g. "grape": {"top_k": 1})
are replaced by their GRAPE selection, scored with the run's model and template; a plain llamafactory-cli ignores it.
  train config.yaml [key=value ...]   select, then train (llamafactory-cli train's arguments, torchrun included)
  select config.yaml -o DIR           select only; then: llamafactory-cli train DIR/train.yaml
Options: grape_plugin/integrations/llamafactory/README.md."""

from typing import Any, Callable

from grape_plugin.cli import host_commands
from grape_plugin.hookspecs import hookimpl


@hookimpl
def grape_register_commands(register: Callable[[str, Callable[[Any], None]], None]) -> None:
    """``grape-plugin llamafactory train|select`` (``host.train``, ``host.select``): this module is a ``grape_plugin``
    entry point, so that the core's CLI imports no host integration and LLaMA-Factory loads only when a command runs."""
    register("llamafactory", host_commands("llamafactory", "LLaMA-Factory", __doc__, f"{__package__}.host"))
