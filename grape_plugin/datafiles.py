"""Read JSON, JSONL, Parquet, CSV and saved HF datasets through ``datasets``; write selections back.

Errors name the file and the row: when ``datasets`` cannot parse a JSON file, the file is re-read line by
line to find the first bad row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import GrapeError, input_error

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_dataset(path: str | Path, split: Optional[str] = None) -> Any:
    """A ``datasets.Dataset`` of the file's rows; of a saved folder's ``split`` (default ``train``)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise GrapeError(f"{path}: no such file or folder")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise GrapeError(f"{path}: not a saved Hugging Face dataset ({exc})") from None
        return pick_split(data, split, str(path))
    if split not in (None, "train"):
        raise GrapeError(f"{path}: --split {split}: a data file has one split, train; split names a saved dataset's")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise GrapeError(f"{path}: unsupported file type; expected {', '.join(BUILDERS)} or a saved dataset folder")
    if path.stat().st_size == 0:
        raise GrapeError(f"{path}: the file is empty")
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types; find the row ourselves where we can
        if builder == "json":
            find_bad_json(path)
        raise GrapeError(f"{path}: cannot read it: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if len(data) == 0:
        raise GrapeError(f"{path}: the file has no rows")
    release_memory()  # converting the file to Arrow freed about as much as the file: give it back
    return data


def release_memory() -> None:
    """Give freed memory back to the OS: Arrow's pool and glibc's heap keep what was freed (parsed rows, texts) for
    reuse, so the resident memory of a long run would otherwise stay at its highest point."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, looked up once (None on a C library without it)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def pick_split(data: Any, split: Optional[str], where: str, option: str = "--split") -> Any:
    """One split of a ``DatasetDict`` (``split``, else ``train``); a plain ``Dataset`` as it is. ``option`` is
    where the user names a split."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    name = split or "train"
    if name not in data:
        raise GrapeError(f"{where}: no split '{name}'; its splits are {', '.join(data)}: name one with {option}")
    return data[name]


def find_bad_json(path: Path) -> None:
    """Raise an error naming the first row that is not a JSON object, or whose field types disagree."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GrapeError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise GrapeError(f"{path}: line {n + 1}: not valid JSON: {exc.msg}") from None
    types: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise input_error(str(path), i, None, f"expected a JSON object, got {type(row).__name__}")
        for key, value in row.items():
            kind = type(value).__name__
            if value is not None and types.setdefault(key, (kind, i))[0] != kind:
                first, at = types[key]
                raise input_error(str(path), i, key, f"is a {kind}, but row {at + 1} has a {first}")


def safe_filename(name: str, suffix: str = "") -> str:
    """A file name made from a config-supplied ``name`` that cannot leave its folder (no separators, no ``..``)."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    if safe != name or not safe:
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe + suffix


def publish_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """Make ``folder`` appear whole or not at all: ``fill`` writes a staging sibling that is then renamed into
    place. When another process (a rank, a node, a concurrent run) published it first, the staged copy is dropped."""
    import os
    import shutil
    import socket

    staging = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not folder.is_dir():
            raise


def write_dataset(data: Any, out_dir: Path, stem: str, like: Path) -> Path:
    """Write ``data`` into ``out_dir`` in the same kind of file as ``like`` (JSONL for JSON input)."""
    suffix = like.suffix.lower() if like.is_file() else ""
    if suffix == ".parquet":
        target = out_dir / f"{stem}.parquet"
        data.to_parquet(str(target))
    elif suffix == ".csv":
        target = out_dir / f"{stem}.csv"
        data.to_csv(str(target), index=False)
    elif suffix in (".json", ".jsonl"):
        target = out_dir / f"{stem}.jsonl"
        data.to_json(str(target), lines=True, force_ascii=False)
    else:
        target = out_dir / stem
        data.save_to_disk(str(target))
    return target
