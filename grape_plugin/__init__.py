"""GRAPE: keep, per instruction, the candidate response the base model about to be fine-tuned fits best.

Python API (the CLI and the host integrations are thin layers over it)::

    from grape_plugin import GrapeConfig, run, write
    data, selection = run("pool.jsonl", GrapeConfig(model="path/to/base-model"))
    write(data, selection, "out/")
"""

from .components import Components, select
from .config import GrapeConfig
from .errors import GrapeError
from .files import read, run, write
from .hookspecs import hookimpl
from .pipeline import run_groups
from .records import Candidate, CandidateOutline, Drops, Group, Grouped, GroupOutline, Results, Score, Selection, Stats
from .render import render_groups
from .version import __version__

__all__ = [
    "Candidate",
    "CandidateOutline",
    "Components",
    "Drops",
    "GrapeConfig",
    "GrapeError",
    "Group",
    "GroupOutline",
    "Grouped",
    "Results",
    "Score",
    "Selection",
    "Stats",
    "__version__",
    "hookimpl",
    "read",
    "render_groups",
    "run",
    "run_groups",
    "select",
    "write",
]
