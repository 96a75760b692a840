"""The CLI's host: a data file in, its selection in the file's own shape out; and the Python API over it.

    from grape_plugin import GrapeConfig, run, write
    data, selection = run("pool.jsonl", GrapeConfig(model="path/to/base-model"))
    write(data, selection, "out/")
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .components import Components
from .config import GrapeConfig
from .errors import GrapeError
from .formats import Context, Format, Input, detect_format, group_rows, loader
from .host import MANIFEST, BaseHost, output_folder, select_from, write_folder
from .records import Group, Grouped, GroupOutline, Selection


@dataclass(frozen=True)
class FileInput:
    """Groups read from one file, with what is needed to write a selection back in the same shape."""

    path: Path
    dataset: Any
    format: Format
    context: Context
    grouped: Grouped
    parts: Components
    limit: Optional[int] = None

    @property
    def groups(self) -> tuple[GroupOutline, ...]:
        """The outlines (no texts; see ``Grouped``)."""
        return self.grouped.groups

    def texts(self) -> tuple[Group, ...]:
        """Every group with its texts: all of them in memory at once, for small inputs (tests, notebooks)."""
        return self.grouped.load(self.groups)

    def selected(self, selection: Selection) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape."""
        picks = selection.picks_in_order(texts=self.format.selected_reads_texts)
        return self.format.selected(self.dataset, picks, self.context)


def read(path: str | Path, parts: GrapeConfig | Components, limit: Optional[int] = None) -> FileInput:
    """Read a file and group its candidates (outlines, remembered in ``cache_dir`` for the next run on the same data
    and options); ``limit`` keeps the first N instructions."""
    from .datafiles import read_dataset
    from .outlines import outline_key, remembered

    parts = parts if isinstance(parts, Components) else Components.of(parts)
    cfg, path = parts.cfg, Path(path)
    dataset = read_dataset(path, cfg.split)
    ctx = Context(str(path), list(dataset.column_names), cfg)
    fmt = detect_format(ctx, parts.formats, dataset)
    inputs = [Input(dataset, fmt, ctx)]
    key = outline_key(dataset._fingerprint, fmt.name, cfg, limit)
    grouped = remembered(cfg.cache_dir, key, lambda: group_rows(inputs, cfg.min_candidates, limit))
    return FileInput(path, dataset, fmt, ctx, replace(grouped, load=loader(inputs)), parts, limit)


class FileHost(BaseHost):
    """A data file as a host: its groups, the configured template and scorer, and ``out`` as the selection's folder
    (written in place: the user's folder, not one the host owns)."""

    def __init__(self, data: FileInput, out: Optional[str | Path] = None):
        super().__init__(data.parts)
        self.data, self.where = data, str(data.path)
        self.out = None if out is None else output_folder(out, [data.path])

    def read(self) -> Grouped:
        return self.data.grouped

    def key_parts(self) -> Mapping[str, Any]:
        d = self.data
        return {"file": str(d.path.resolve()), "rows": d.dataset._fingerprint, "format": d.format.name, "limit": d.limit}

    def folder(self, key: str) -> Path:
        if self.out is None:
            raise GrapeError(f"{self.where}: no output folder given (-o)")
        return self.out

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        from .datafiles import write_dataset

        return {"selected": write_dataset(self.data.selected(selection), folder, "selected", self.data.path)}

    def publish(self, folder: Path, fill: Callable[[Path], None]) -> None:
        """Write into ``folder`` itself; the manifest of an earlier selection goes first, so that a run cut short
        leaves no folder that claims to hold a whole selection."""
        (folder / MANIFEST).unlink(missing_ok=True)
        fill(folder)


def run(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None, token_scores: bool = False
        ) -> tuple[FileInput, Selection]:  # fmt: skip
    """Read a file and select from it (``host.select_from``); the selection keeps per-token arrays with
    ``token_scores``."""
    data = read(path, cfg, limit)
    return data, select_from(FileHost(data), token_scores=token_scores)


def write(data: FileInput, selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """Write ``selected.*`` (the input's shape) and the report files into ``out_dir``; the files, by name."""
    host = FileHost(data, out_dir)
    return write_folder(host, selection, host.folder(""))
