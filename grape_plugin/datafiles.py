"""Read JSON, JSONL, Parquet, CSV (JSON and CSV also compressed) and saved HF datasets through ``datasets``; write
selections back.

Errors name the file and the row: when ``datasets`` cannot parse a JSON file, the file is re-read line by
line to find the first bad row. A .json file that is one object holding its records under a key is read from that
key when it is the object's only list.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import IO, Any, Callable, Optional

from .errors import GrapeError, input_error

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}  # suffix: the module reading it


def file_kind(path: Path) -> tuple[str, Optional[str]]:
    """(the suffix of the data, the compression suffix) of a data file: ``x.jsonl.gz`` is (``.jsonl``, ``.gz``)."""
    suffixes = [s.lower() for s in path.suffixes] or [""]
    compression = suffixes[-1] if suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-2] if compression and len(suffixes) > 1 else "" if compression else suffixes[-1]), compression


def builder_of(path: Path) -> Optional[str]:
    """The ``datasets`` builder that reads a data file (Parquet is never read compressed)."""
    suffix, compression = file_kind(path)
    return None if compression and suffix == ".parquet" else BUILDERS.get(suffix)


def open_text(path: Path) -> IO[str]:
    """A data file's text, decompressed."""
    compression = file_kind(path)[1]
    if compression is None:
        return open(path, encoding="utf-8")
    if compression == ".zst":
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return importlib.import_module(COMPRESSIONS[compression]).open(path, "rt", encoding="utf-8")


def records_key(value: Any) -> Optional[str]:
    """The key of a JSON document's records: its only list, when that holds objects that are not chat turns (a
    lone row of messages is a row)."""
    lists = [k for k, v in value.items() if isinstance(v, list)] if isinstance(value, dict) else []
    records = value[lists[0]] if len(lists) == 1 else None
    if not records or not all(isinstance(r, dict) and not {"role", "from"} & r.keys() for r in records):
        return None
    return lists[0]


def read_dataset(path: str | Path, split: Optional[str] = None) -> Any:
    """A ``datasets.Dataset`` of the file's rows, of a folder's files, or of a saved dataset's ``split`` (default
    ``train``)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise GrapeError(f"{path}: no such file or folder")
    if path.is_dir():
        if not saved_dataset(path):
            return read_folder(path, split)
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise GrapeError(f"{path}: not a saved Hugging Face dataset ({exc})") from None
        return pick_split(data, split, str(path))
    if split not in (None, "train"):
        raise GrapeError(f"{path}: --split {split}: a data file has one split, train; split names a saved dataset's")
    builder, (suffix, compression) = builder_of(path), file_kind(path)
    if builder is None:
        raise GrapeError(f"{path}: unsupported file type; expected {', '.join(BUILDERS)} (JSON and CSV also as "
                         f"{', '.join(COMPRESSIONS)}), a folder of them or a saved dataset folder")  # fmt: skip
    if compression == ".zst" and importlib.util.find_spec("zstandard") is None:
        raise GrapeError(f"{path}: reading .zst files needs the zstandard package: pip install zstandard")
    if path.stat().st_size == 0:
        raise GrapeError(f"{path}: the file is empty")
    data = load_file(path, builder)
    if suffix == ".json" and len(data) == 1 and (key := records_key(data[0])) is not None:
        data = load_file(path, builder, field=key)  # {"version": ..., "data": [...]}: the records
    if len(data) == 0:
        raise GrapeError(f"{path}: the file has no rows")
    release_memory()  # converting the file to Arrow freed about as much as the file: give it back
    return data


def saved_dataset(path: Path) -> bool:
    """Whether the folder ``path`` is one that ``save_to_disk`` wrote (a dataset or a ``DatasetDict``)."""
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def folder_files(path: Path) -> list[Path]:
    """The data files of a folder that is not a saved dataset (shards of one split, a LLaMA-Factory dataset folder),
    in name order; hidden files are not data."""
    files = sorted(f for f in path.iterdir() if not f.name.startswith("."))
    if not files or not all(f.is_file() for f in files):
        raise GrapeError(f"{path}: expected a folder of data files only, or a saved Hugging Face dataset")
    return files


def read_folder(path: Path, split: Optional[str]) -> Any:
    """The rows of a folder's data files, one after the other."""
    import datasets

    parts = [read_dataset(f, split) for f in folder_files(path)]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        raise GrapeError(f"{path}: its files do not have the same columns ({exc})") from None


def load_file(path: Path, builder: str, field: Optional[str] = None) -> Any:
    """One data file as a ``datasets.Dataset`` (``field``: the key of a JSON object's records)."""
    import datasets

    try:
        options = {"field": field} if field else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets raises many types; find the row ourselves where we can
        if builder == "json":
            key = find_bad_json(path, field)
            if key is not None:
                return load_file(path, builder, field=key)
        raise GrapeError(f"{path}: cannot read it: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


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


def find_bad_json(path: Path, field: Optional[str] = None) -> Optional[str]:
    """Raise an error naming the first row that is not a JSON object, or whose field types disagree. A file that is
    one JSON object holds its rows under ``field``, else under its only list of objects: that key is returned when
    ``field`` is not given (an object with several such lists is an error naming them)."""
    with open_text(path) as fh:
        text = fh.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise GrapeError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
        whole = None  # JSON lines
    if isinstance(whole, dict):
        key = field or (records_key(whole) if file_kind(path)[0] == ".json" else None)
        if key is not None and field is None:
            return key
        lists = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if key is None and len(lists) > 1:
            raise GrapeError(f"{path}: one JSON object with lists of records under {', '.join(lists)}; records are "
                             "read from a key only when it is the object's only list: keep one list per file")
        rows = whole[key] if key is not None else [whole]
    elif isinstance(whole, list):
        rows = whole
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
        for name, value in row.items():
            kind = type(value).__name__
            if value is not None and types.setdefault(name, (kind, i))[0] != kind:
                first, at = types[name]
                raise input_error(str(path), i, name, f"is a {kind}, but row {at + 1} has a {first}")
    return None


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
    """Write ``data`` into ``out_dir`` in the same kind of file as ``like`` (JSONL for JSON input; for a folder of
    data files, its first), uncompressed."""
    if like.is_dir() and not saved_dataset(like):
        like = folder_files(like)[0]
    builder = builder_of(like) if like.is_file() else None  # written uncompressed
    if builder == "parquet":
        target = out_dir / f"{stem}.parquet"
        data.to_parquet(str(target))
    elif builder == "csv":
        target = out_dir / f"{stem}.csv"
        data.to_csv(str(target), index=False)
    elif builder == "json":
        target = out_dir / f"{stem}.jsonl"
        data.to_json(str(target), lines=True, force_ascii=False)
    else:
        target = out_dir / stem
        data.save_to_disk(str(target))
    return target
