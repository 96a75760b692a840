"""What the core gives every host: reading a folder of data files."""

from __future__ import annotations

import pytest

from tests.helpers import pool_rows, write_jsonl

from grape_plugin import GrapeError
from grape_plugin.datafiles import write_dataset
from grape_plugin.host import read_dataset


def test_a_folder_of_data_files_reads_as_one_dataset(tmp_path):
    rows = pool_rows(2)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", rows[8:])
    write_jsonl(folder / "a.jsonl", rows[:8])
    (folder / ".hidden").write_text("not data")
    assert [r["id"] for r in read_dataset(folder)] == [r["id"] for r in rows]  # in name order
    assert write_dataset(read_dataset(folder), tmp_path, "selected", folder).name == "selected.jsonl"  # like a.jsonl
    (folder / "notes.txt").write_text("not data either")
    with pytest.raises(GrapeError, match="notes.txt: unsupported file type"):
        read_dataset(folder)
    (folder / "notes.txt").unlink()
    (folder / "more").mkdir()
    with pytest.raises(GrapeError, match="shards: expected a folder of data files only, or a saved Hugging Face"):
        read_dataset(folder)
