"""The one exception users see: a message that names the file, the row and the field (or the option)."""

from __future__ import annotations

import re
from typing import Optional

LIST_POSITION = re.compile(r"\[\d+\]")
SKIP_HINT = "to skip such rows and count them, set on_bad_row: skip (--on-bad-row skip)"


class GrapeError(Exception):
    """A problem with the user's input, options or environment, shown without a traceback."""


class RowError(GrapeError):
    """A problem with one input row: ``on_bad_row: skip`` skips the row and counts it under ``reason``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def input_error(file: str, row: Optional[int], field: Optional[str], problem: str) -> GrapeError:
    """``file: row N: field 'x': problem`` (row numbers are 1-based, as an editor shows lines).

    With a row, it is a ``RowError`` whose reason is the field (list positions left out) and the problem.
    """
    where = str(file)
    if row is not None:
        where += f": row {row + 1}"
    if field is not None:
        where += f": field '{field}'"
    if row is None:
        return GrapeError(f"{where}: {problem}")
    reason = f"{LIST_POSITION.sub('[]', field)}: {problem}" if field else problem
    return RowError(f"{where}: {problem}", reason)
