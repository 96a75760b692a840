"""A score store on disk: SQLite, keyed by the model identity and the exact token ids and span scored.

The key covers everything a score depends on (weights, dtype, template and rendering settings all show
up in the identity or the ids), so changing ``top_k`` or a budget rescores nothing, and a run that died
resumes where it stopped: every batch is committed as it finishes. Plain data, no pickle; WAL mode lets
several ranks write at once. A file that is not a healthy database is moved aside and rebuilt.

Per-token log-probabilities and ranks are BLOBs of little-endian float32 / int32 (NULL when not kept). The layout
is versioned with ``PRAGMA user_version``: a file written by an older layout has its table rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

from .render import Rendered
from .scoring import Score

log = logging.getLogger(__name__)
SCHEMA = 2  # 1: sums and counts only; 2: plus per-token log-probabilities and ranks


def item_key(identity: str, item: Rendered) -> str:
    head = f"{identity}\n{item.start}:{item.end}\n".encode()
    return hashlib.sha256(head + item.input_ids.astype("<i4", copy=False).tobytes()).hexdigest()


class ScoreCache:
    """Scores for one model identity, in ``cache_dir/<hash of identity>.sqlite``."""

    def __init__(self, cache_dir: Path, identity: str):
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.path = cache_dir / (hashlib.sha256(identity.encode()).hexdigest()[:24] + ".sqlite")
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            broken = self.path.with_suffix(".corrupt")
            log.warning("score cache %s is damaged (%s); moved to %s and rebuilt", self.path, exc, broken)
            self.path.replace(broken)
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            db.close()
            raise sqlite3.DatabaseError("quick_check failed")
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.execute("BEGIN IMMEDIATE")  # one process migrates an old file; the others wait and see the result
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA:
                db.execute("DROP TABLE IF EXISTS scores")  # an older layout: its scores are computed again
                db.execute(f"PRAGMA user_version={SCHEMA}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS scores "
                "(key TEXT PRIMARY KEY, logprob_sum REAL, n_tokens INTEGER, logprobs BLOB, ranks BLOB)"
            )
        return db

    def get_many(self, keys: list[str]) -> dict[str, Score]:
        found: dict[str, Score] = {}
        for at in range(0, len(keys), 500):
            part = keys[at : at + 500]
            marks = ",".join("?" * len(part))
            for key, *values in self.db.execute(f"SELECT * FROM scores WHERE key IN ({marks})", part):
                found[key] = Score(*values)
        return found

    def put_many(self, pairs: Iterable[tuple[str, Score]]) -> None:
        rows = [(k, s.logprob_sum, s.n_tokens, s.token_logprobs, s.token_ranks) for k, s in pairs]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


def open_cache(cache_dir: Optional[Path], identity: str) -> Optional[ScoreCache]:
    return None if cache_dir is None else ScoreCache(Path(cache_dir), identity)
