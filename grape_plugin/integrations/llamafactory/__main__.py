"""The torchrun entry of ``grape-plugin llamafactory train`` (LLaMA-Factory's launcher runs this file on every
rank): ``config.yaml [key=value ...]`` is selected (the scoring sharded over the ranks) and trained on. Also
``torchrun ... -m grape_plugin.integrations.llamafactory config.yaml [key=value ...]``."""

import logging
import sys

from grape_plugin.errors import GrapeError
from grape_plugin.integrations.llamafactory.host import train_rank

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
try:
    sys.exit(train_rank(sys.argv[1:]))
except GrapeError as exc:
    print(f"grape-plugin: error: {exc}", file=sys.stderr)
    sys.exit(2)
