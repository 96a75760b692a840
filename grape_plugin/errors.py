"""The one exception users see: a message that names the file, the row and the field (or the option)."""

from __future__ import annotations

from typing import Optional


class GrapeError(Exception):
    """A problem with the user's input, options or environment, shown without a traceback."""


def input_error(file: str, row: Optional[int], field: Optional[str], problem: str) -> GrapeError:
    """``file:row N: field 'x': problem`` (row numbers are 1-based, as an editor shows lines)."""
    where = str(file)
    if row is not None:
        where += f": row {row + 1}"
    if field is not None:
        where += f": field '{field}'"
    return GrapeError(f"{where}: {problem}")
