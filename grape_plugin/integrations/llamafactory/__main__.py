"""The torchrun entry of ``grape-plugin llamafactory train`` (LLaMA-Factory's launcher runs this file on every
rank): ``config.yaml [key=value ...]`` is selected (the scoring sharded over the ranks) and trained on. Also
``torchrun ... -m grape_plugin.integrations.llamafactory config.yaml [key=value ...]``."""

import logging
import sys

from grape_plugin.cli import guarded
from grape_plugin.integrations.llamafactory.host import train_rank

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
sys.exit(guarded(lambda: train_rank(sys.argv[1:])))
