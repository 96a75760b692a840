"""The torchrun entry of ``grape-plugin llamafactory train``: ``python -m grape_plugin.integrations.llamafactory
config.yaml [key=value ...]`` selects (sharded over the ranks) and trains, like LLaMA-Factory's launcher entry."""

import logging
import sys

from grape_plugin.errors import GrapeError

from .compat import read_args
from .train import train_rank

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
try:
    sys.exit(train_rank(read_args(sys.argv[1:])))
except GrapeError as exc:
    print(f"grape-plugin: error: {exc}", file=sys.stderr)
    sys.exit(2)
