"""A score store on disk that many processes and nodes can share: append-only files, one per writer.

Layout: ``cache_dir/<hash of the model identity>/<host>-<pid>-r<rank>-<start>.grs``. Each process creates its own
file exclusively (one per process and run) and only ever appends to it, so nothing needs a lock and nothing is
rewritten: it works on a node-local disk and on the network file systems several nodes share (SQLite's write-ahead
log does not). When a run starts, every file of the identity is read: all ranks' and all earlier runs', whatever
their number of ranks, so a run resumes after a crash with any number of ranks. Reading them builds an index (each
key's best record: where it is), so that memory holds no scores and lookups read only the records asked for.

File: ``MAGIC``, the schema (u32), then records: u32 payload length, u32 CRC-32 of the payload, payload = 32-byte
key, f64 sum of log-probabilities, i32 response tokens, i32 rendered tokens (0: too long, dropped), u8 flags, then
the per-token float32 log-probabilities and int32 ranks when kept (all little-endian). A record cut short or failing
its checksum (a process killed mid-write, a damaged disk) ends the reading of that file: the complete records
before it are used, the rest is never trusted. Plain data, no pickle. Files of another schema are ignored with a
log line, and so are the SQLite caches of earlier versions (``<hash>.sqlite``): their scores are computed again.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Optional

from .records import GroupOutline, Score
from .render import Rendered, RenderedKey

log = logging.getLogger(__name__)
SCHEMA = 3  # 1, 2: SQLite (sums and counts; plus per-token arrays); 3: append-only record files
MAGIC = b"GRAPE-SC"
HEAD = struct.Struct("<8sI")  # magic, schema
FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
RECORD = struct.Struct("<32sdiiB")  # key, logprob_sum, n_tokens, n_ids, flags
SCORED, LOGPROBS, RANKS, TRUNCATED = 1, 2, 4, 8
SUFFIX = ".grs"
SYNC_SECONDS = 10.0


class Located(NamedTuple):
    """Where a key's record is: file number (in ``ScoreCache.files()``), payload offset and length, and its first
    ``RECORD.size`` bytes (the score without the arrays, and the flags)."""

    file: int
    offset: int
    length: int
    head: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """What the cache holds for one candidate: its score (None when it was not scored: too long, or in an instruction
    that needed no scores), its rendered length after ``max_length`` (0: too long, dropped), whether it was cut, and
    whether its record holds the per-token arrays (they are in ``score`` only when read with them)."""

    score: Optional[Score]
    n_ids: int = 0
    truncated: bool = False
    arrays: bool = False

    @property
    def rank(self) -> tuple[bool, bool]:
        """Of two entries for one key, the one that knows more wins."""
        return self.score is not None, self.score is not None and (self.arrays or self.score.token_logprobs is not None)


def item_key(identity: str, item: Rendered) -> bytes:
    """The key of a rendered candidate: the model identity, the token ids and the scored span."""
    head = f"{identity}\n{item.start}:{item.end}\n".encode()
    return hashlib.sha256(head + item.input_ids.astype("<i4", copy=False).tobytes()).digest()


def encode(key: bytes, entry: Entry) -> bytes:
    s = entry.score
    arrays = [] if s is None else [a for a in (s.token_logprobs, s.token_ranks) if a is not None]
    flags = (SCORED * (s is not None) | LOGPROBS * (s is not None and s.token_logprobs is not None)
             | RANKS * (s is not None and s.token_ranks is not None) | TRUNCATED * entry.truncated)  # fmt: skip
    payload = RECORD.pack(key, s.logprob_sum if s else 0.0, s.n_tokens if s else 0, entry.n_ids, flags) + b"".join(arrays)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Entry:
    """An entry from its payload (the per-token arrays only when the payload holds them)."""
    _, total, n_tokens, n_ids, flags = RECORD.unpack_from(payload)
    at, size = RECORD.size, 4 * n_tokens
    logprobs = payload[at : at + size] if flags & LOGPROBS and len(payload) > at else None
    at += size * bool(flags & LOGPROBS)
    ranks = payload[at : at + size] if flags & RANKS and len(payload) > at else None
    score = Score(total, n_tokens, logprobs, ranks) if flags & SCORED else None
    return Entry(score, n_ids, bool(flags & TRUNCATED), knows(flags)[1])


def knows(flags: int) -> tuple[bool, bool]:
    """How much a record knows (``Entry.rank``), from its flags."""
    return bool(flags & SCORED), bool(flags & SCORED and flags & LOGPROBS)


def records(path: Path) -> Iterator[tuple[bytes, int, int, bytes]]:
    """(key, payload offset, payload length, the payload's first ``RECORD.size`` bytes) of each complete, intact
    record of one file (memory-mapped: only what is returned is copied)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < HEAD.size or HEAD.unpack(fh.read(HEAD.size)) != (MAGIC, SCHEMA):
            log.info("score cache: %s is not a schema-%d file; ignored", path, SCHEMA)
            return
        with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as data:
            at = HEAD.size
            while at < size:
                length, crc = FRAME.unpack_from(data, at) if at + FRAME.size <= size else (0, 0)
                start, at = at + FRAME.size, at + FRAME.size + length
                if length < RECORD.size or at > size:
                    log.info("score cache: %s ends in an incomplete record (a write in progress or killed); "
                             "the records before it are used", path)  # fmt: skip
                    return
                if zlib.crc32(data[start:at]) != crc:
                    log.warning("score cache: %s has a damaged record at byte %d; the rest of that file is ignored",
                                path, start - FRAME.size)  # fmt: skip
                    return
                head = data[start : start + RECORD.size]
                yield head[:32], start, length, head


class ScoreCache:
    """Entries for one model identity, in ``cache_dir/<hash of identity>/``: this process appends to its own file."""

    def __init__(self, cache_dir: Path, identity: str, rank: int = 0):
        name = hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.identity, self.rank = identity, rank
        self.folder = cache_dir / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.out: Optional[BinaryIO] = None
        self._index: Optional[dict[bytes, Located]] = None
        self._files: list[Path] = []
        self.synced = time.monotonic()
        self.lock = threading.Lock()  # the pipeline renders the next chunk (outcomes) while it commits scores
        if (cache_dir / f"{name}.sqlite").exists():
            log.info("score cache: %s is an older SQLite cache; ignored (its scores are computed again)",
                     cache_dir / f"{name}.sqlite")  # fmt: skip

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*" + SUFFIX))

    def index(self) -> dict[bytes, Located]:
        """Where each key's best record is, over every file of this identity (read once, when first needed)."""
        if self._index is None:
            self._files, self._index = self.files(), {}
            for n, path in enumerate(self._files):
                try:
                    for key, offset, length, head in records(path):
                        held = self._index.get(key)
                        if held is None or knows(head[-1]) >= knows(held.head[-1]):
                            self._index[key] = Located(n, offset, length, head)
                except FileNotFoundError:
                    pass  # removed since listed (a compaction): its records are in the newer file
        return self._index

    def get_many(self, keys: Iterable[bytes], arrays: bool = True) -> dict[bytes, Entry]:
        """The entries of ``keys`` found in this identity's files (entries written by this process not included);
        without ``arrays``, their scores without the per-token arrays."""
        index = self.index()
        held = {k: index[k] for k in keys if k in index}
        if not arrays:
            return {k: decode(at.head) for k, at in held.items()}
        found, handles = {}, {}
        try:
            for key, at in sorted(held.items(), key=lambda kv: kv[1][:2]):
                fh = handles.get(at.file) or handles.setdefault(at.file, open(self._files[at.file], "rb"))  # noqa: SIM115
                fh.seek(at.offset)
                found[key] = decode(fh.read(at.length))
        finally:
            for fh in handles.values():
                fh.close()
        return found

    def put_many(self, pairs: Iterable[tuple[bytes, Entry]]) -> None:
        """Append entries to this process's file (created on first use). They are written through at once (a
        killed process loses none) and synced to disk every ``SYNC_SECONDS`` and on close (against a crash of the
        machine)."""
        data = b"".join(encode(k, e) for k, e in pairs)
        if not data:
            return
        with self.lock:
            if self.out is None:
                self.out = self._create()
            self.out.write(data)
            self.out.flush()
            if time.monotonic() - self.synced > SYNC_SECONDS:
                self.sync()

    def sync(self) -> None:
        if self.out is not None:
            os.fsync(self.out.fileno())
        self.synced = time.monotonic()

    def _create(self) -> BinaryIO:
        stem = f"{socket.gethostname()}-{os.getpid()}-r{self.rank}-{time.time_ns()}"
        fh = open(self.folder / (stem + SUFFIX), "xb")  # noqa: SIM115 (open for the run; closed by close())
        fh.write(HEAD.pack(MAGIC, SCHEMA))
        return fh

    def close(self) -> None:
        if self.out is not None:
            self.sync()
            self.out.close()
            self.out = None


def open_cache(cache_dir: Optional[Path], identity: str, rank: int = 0) -> Optional[ScoreCache]:
    return None if cache_dir is None else ScoreCache(Path(cache_dir), identity, rank)


def render_prefix(identity: str, render: Any, max_length: Optional[int], over_length: str) -> Optional[str]:
    """What every cache key of a renderer with a ``key`` starts with: all a candidate's tokens depend on but its
    own text (None for a renderer without a key: its candidates are keyed by their token ids, once rendered)."""
    key = getattr(render, "key", None)
    return None if key is None else f"{identity}\n{key}\n{max_length}\n{over_length}\n"


def text_keys(prefix: str, group: GroupOutline) -> list[bytes]:
    """The cache key of each candidate, from the digests of its text and its instruction's (prompt and context)."""
    head = hashlib.sha256(f"{prefix}{group.prompt_hash}\n".encode())
    keys = []
    for cand in group.candidates:
        h = head.copy()
        h.update(cand.digest)
        keys.append(h.digest())
    return keys


def cached_entries(cache: ScoreCache, keys: dict[RenderedKey, bytes], arrays: bool) -> dict[RenderedKey, Entry]:
    """The entries the cache holds for ``keys`` (candidate -> cache key), by candidate."""
    found = cache.get_many(keys.values(), arrays)
    return {w: found[k] for w, k in keys.items() if k in found}


def usable(entry: Entry, keep_token_scores: bool) -> bool:
    """Whether a cached entry's score serves a run: it has the per-token arrays when the run keeps them."""
    return entry.score is not None and (entry.arrays or not keep_token_scores)


def kept_part(score: Score, keep_token_scores: bool) -> Score:
    """A score as a run keeps it: without its per-token arrays when it does not keep them."""
    return score if keep_token_scores else score.without_tokens()
