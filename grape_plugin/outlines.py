"""A file's groups, kept on disk: a rerun on unchanged data and options reads no rows to group them again.

``cache_dir/groups/<key>.arrow`` holds the outlines (``Grouped``: keys, digests, where each candidate is; no text)
as one Arrow table (a row per candidate, with its group's key) in an IPC stream, written once and renamed into
place. The key covers this release, the
dataset's fingerprint (``datasets`` derives it from the file and its modification time), the format and every
option that reading and grouping depend on. Plain data: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .config import GrapeConfig
from .records import CandidateOutline, Drops, Grouped, GroupOutline

READING = ("format", "split", "group_by", "on_bad_row", "source_column", "response_column", "candidates_column",
           "prompt_column", "context_column", "system_column", "min_candidates")  # fmt: skip
CANDIDATE = ("source", "row", "index", "part", "item", "digest", "chars")  # an outline's fields
READER = 2  # bump when the same rows and options group differently (2: context and history group)


def outline_key(fingerprint: str, format_name: str, cfg: GrapeConfig, limit: Optional[int]) -> str:
    from .version import __version__

    options = {name: getattr(cfg, name) for name in READING}
    text = json.dumps([__version__, READER, fingerprint, format_name, options, limit], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def save(grouped: Grouped, path: Path) -> None:
    """Write ``grouped`` (without its loader) to ``path``, atomically: one row per candidate."""
    import pyarrow as pa

    pairs = [(n, g, c) for n, g in enumerate(grouped.groups) for c in g.candidates]
    table = pa.table({
        "group": pa.array([n for n, _, _ in pairs], pa.int64()),
        **{name: [getattr(g, name) for _, g, _ in pairs] for name in ("key", "prompt_hash")},
        "group_row": [g.row for _, g, _ in pairs],
        **{name: [getattr(c, name) for _, _, c in pairs] for name in CANDIDATE if name != "digest"},
        "digest": pa.array([c.digest for _, _, c in pairs], pa.binary(16)),
    })  # fmt: skip
    meta = {"drops": json.dumps(grouped.drops.as_dict()), "skipped": json.dumps(list(grouped.skipped)),
            "reading": json.dumps(list(grouped.reading))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema.with_metadata(meta)) as out:
        out.write_table(table)
    os.replace(tmp, path)


def load(path: Path) -> Optional[Grouped]:
    """The outlines saved at ``path`` (without a loader), or None when there are none or they cannot be read."""
    import pyarrow as pa

    try:
        with pa.OSFile(str(path), "rb") as source:
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    col = table.to_pydict()
    col["source"] = [None if s is None else sys.intern(s) for s in col["source"]]
    groups: list[GroupOutline] = []
    members: list[CandidateOutline] = []
    for at, n in enumerate(col["group"]):
        members.append(CandidateOutline(**{name: col[name][at] for name in CANDIDATE}))
        if at + 1 == len(col["group"]) or col["group"][at + 1] != n:
            groups.append(GroupOutline(col["key"][at], tuple(members), col["group_row"][at], col["prompt_hash"][at]))
            members = []
    meta = table.schema.metadata
    return Grouped(tuple(groups), Drops(**json.loads(meta[b"drops"])), tuple(json.loads(meta[b"skipped"])),
                   reading=tuple(json.loads(meta.get(b"reading", b"[]"))))


def remembered(folder: Optional[Path], key: str, group: Callable[[], Grouped]) -> Grouped:
    """``group()``'s outlines, read from ``folder`` when saved under ``key`` before, else made and saved there (no
    folder: always made). What is read has no loader: the caller gives it the one of its inputs."""
    if folder is None:
        return group()
    path = Path(folder) / "groups" / f"{key}.arrow"
    saved = load(path)
    if saved is not None:
        return saved
    grouped = group()
    save(grouped, path)
    return grouped
