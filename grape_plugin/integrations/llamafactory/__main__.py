"""The torchrun entry of ``grape-plugin llamafactory train`` (LLaMA-Factory's launcher runs this file on every
rank): ``config.yaml [key=value ...]`` is selected (the scoring sharded over the ranks) and trained on. Also
``torchrun ... -m grape_plugin.integrations.llamafactory config.yaml [key=value ...]``."""

import sys

from grape_plugin.cli import logged
from grape_plugin.integrations.llamafactory.host import train_rank

sys.exit(logged(lambda: train_rank(sys.argv[1:])))
