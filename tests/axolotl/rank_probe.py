"""Run the plugin's load_datasets hook as Axolotl does on every rank (under torchrun); print what each rank got."""

import json
import os
import sys

import torch.distributed as dist
from axolotl.cli.config import load_cfg
from axolotl.integrations.base import PluginManager

cfg = load_cfg(sys.argv[1])
assert PluginManager.get_instance().load_datasets(cfg, preprocess=False) is None
result = {
    "rank": int(os.environ["RANK"]),
    "world": dist.get_world_size() if dist.is_initialized() else 1,
    "datasets": [d.path for d in cfg.datasets],
}
sys.stdout.flush()
os.write(1, f"RANK_RESULT {json.dumps(result)}\n".encode())  # one write: the ranks share the pipe, lines must not mix
