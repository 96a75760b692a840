"""GRAPE: keep, per instruction, the candidate response the base model about to be fine-tuned fits best.

Python API (the CLI and the host integrations are thin layers over it)::

    from grape_plugin import GrapeConfig, run, write
    data, selection = run("pool.jsonl", GrapeConfig(model="path/to/base-model"))
    write(data, selection, "out/")
"""

from .candidates import Candidate, Drops, Group
from .config import GrapeConfig
from .errors import GrapeError
from .hookspecs import hookimpl
from .pipeline import Selection, read, render_groups, run, run_groups, score, select, write

__version__ = "0.1.0"
__all__ = [
    "Candidate",
    "Drops",
    "GrapeConfig",
    "GrapeError",
    "Group",
    "Selection",
    "__version__",
    "hookimpl",
    "read",
    "render_groups",
    "run",
    "run_groups",
    "score",
    "select",
    "write",
]
