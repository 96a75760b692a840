"""A score store on disk: SQLite, keyed by the model identity and the exact token ids and span scored.

The key covers everything a score depends on (weights, dtype, template and rendering settings all show
up in the identity or the ids), so changing ``top_k`` or a budget rescores nothing, and a run that died
resumes where it stopped: every batch is committed as it finishes. Plain data, no pickle; WAL mode lets
several ranks write at once. A file that is not a healthy database is moved aside and rebuilt.
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


def item_key(identity: str, item: Rendered) -> str:
    text = f"{identity}\n{item.start}:{item.end}\n" + ",".join(map(str, item.input_ids))
    return hashlib.sha256(text.encode()).hexdigest()


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
        db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, logprob_sum REAL, n_tokens INTEGER)")
        db.commit()
        return db

    def get_many(self, keys: list[str]) -> dict[str, Score]:
        found: dict[str, Score] = {}
        for at in range(0, len(keys), 500):
            part = keys[at : at + 500]
            marks = ",".join("?" * len(part))
            for key, total, n in self.db.execute(f"SELECT * FROM scores WHERE key IN ({marks})", part):
                found[key] = Score(total, n)
        return found

    def put_many(self, pairs: Iterable[tuple[str, Score]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", [(k, s.logprob_sum, s.n_tokens) for k, s in pairs]
            )

    def close(self) -> None:
        self.db.close()


def open_cache(cache_dir: Optional[Path], identity: str) -> Optional[ScoreCache]:
    return None if cache_dir is None else ScoreCache(Path(cache_dir), identity)
