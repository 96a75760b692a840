"""The one way through: read + group -> render -> score -> select -> write -> report.

``run_groups`` is the path every host takes (the CLI's files, Axolotl, LLaMA-Factory, notebooks): a host only
says where the groups come from, how a candidate is rendered and how the scoring model loads (see ``host.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .cache import Entry, ScoreCache, item_key, open_cache
from .config import GrapeConfig
from .distributed import agreed, all_gather, rank_world, shard
from .errors import GrapeError
from .formats import Context, Format, Input, detect_format, group_rows, loader
from .plugins import lookup, registry
from .records import Drops, Group, Grouped, Loader, Score, Selection, Stats
from .render import Rendered, RenderedKey, Renderer, group_chunks, render_groups
from .scoring import Scorer
from .selection import choose, needs_scores

COMMIT_BATCHES = 8  # about this many full batches are scored between two cache commits
SHARE_CHUNK = 4096  # candidates loaded, rendered and scored at a time


@dataclass(frozen=True)
class FileInput:
    """Groups read from one file, with what is needed to write a selection back in the same shape."""

    path: Path
    dataset: Any
    format: Format
    context: Context
    grouped: Grouped

    @property
    def groups(self) -> tuple[Group, ...]:
        """The outlines (no texts; see ``Grouped``)."""
        return self.grouped.groups

    def texts(self) -> tuple[Group, ...]:
        """Every group with its texts: all of them in memory at once, for small inputs (tests, notebooks)."""
        return self.grouped.load(self.groups)

    def selected(self, selection: Selection) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape."""
        picks = selection.picks_in_order(texts=self.format.selected_reads_texts)
        return self.format.selected(self.dataset, picks, self.context)


def read(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None) -> FileInput:
    """Read a file and group its candidates (outlines, remembered in ``cache_dir`` for the next run on the same data
    and options); ``limit`` keeps the first N instructions."""
    from .datafiles import read_dataset
    from .outlines import outline_key, remembered

    path = Path(path)
    dataset = read_dataset(path, cfg.split)
    ctx = Context(str(path), list(dataset.column_names), cfg)
    fmt = detect_format(ctx, registry("formats"), dataset)
    inputs = [Input(dataset, fmt, ctx)]
    key = outline_key(dataset._fingerprint, fmt.name, cfg, limit)
    grouped = remembered(cfg.cache_dir, key, lambda: group_rows(inputs, cfg.min_candidates, limit))
    return FileInput(path, dataset, fmt, ctx, replace(grouped, load=loader(inputs)))


def make_scorer(cfg: GrapeConfig) -> Scorer:
    """The scorer named by ``cfg.scorer``: its tokenizer and identity now, its weights when first needed."""
    return lookup("scorers", cfg.scorer)(cfg)


def make_renderer(scorer: Scorer, cfg: GrapeConfig) -> Renderer:
    """The named template (``cfg.template``) built on the scorer's tokenizer."""
    return lookup("renderers", cfg.template)(scorer.tokenizer, cfg)


class Stopwatch:
    """Seconds per stage: ``lap(name)`` records the time since the previous lap."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Add the time since the previous lap to stage ``name``."""
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.last, 3)
        self.last = now


@dataclass(frozen=True)
class Resolved:
    """Some instructions after ``max_length``, as outlines (``groups``), with the token ids of those rendered
    (``items``; the others are answered by the cache: ``known``), and each candidate's cache key."""

    groups: tuple[Group, ...]
    items: dict[RenderedKey, Rendered]
    drops: Drops
    cut: frozenset[RenderedKey]  # truncated at max_length
    known: dict[RenderedKey, Entry]
    keys: dict[RenderedKey, bytes]

    def n_ids(self, w: RenderedKey) -> int:
        item = self.items.get(w)
        return self.known[w].n_ids if item is None else len(item.input_ids)


@dataclass(frozen=True)
class Share:
    """What one rank did for its instructions: the survivors of ``max_length`` (outlines), each scored candidate's
    score and fit, what rendering dropped, and counts."""

    groups: list[Group] = field(default_factory=list)
    scores: dict[RenderedKey, Score] = field(default_factory=dict)
    fits: dict[RenderedKey, float] = field(default_factory=dict)
    drops: Drops = Drops()
    truncated: int = 0
    scored: int = 0  # candidates scored by this rank in this run
    cached: int = 0  # candidates whose score came from the cache
    tokens_scored: int = 0
    tokens: int = 0  # of its candidates after max_length

    @property
    def counts(self) -> tuple[int, ...]:
        """The counts, in field order (they add up across chunks and ranks)."""
        return self.truncated, self.scored, self.cached, self.tokens_scored, self.tokens


def render_prefix(identity: str, render: Renderer, max_length: Optional[int], over_length: str) -> Optional[str]:
    """What every cache key of a renderer with a ``key`` starts with: all a candidate's tokens depend on but its
    own text (None for a renderer without a key: its candidates are keyed by their token ids, once rendered)."""
    key = getattr(render, "key", None)
    return None if key is None else f"{identity}\n{key}\n{max_length}\n{over_length}\n"


def text_keys(prefix: str, group: Group) -> list[bytes]:
    """The cache key of each candidate, from the digests of its text and its instruction's (prompt and context)."""
    head = hashlib.sha256(f"{prefix}{group.prompt_hash}\n".encode())
    keys = []
    for cand in group.candidates:
        h = head.copy()
        h.update(cand.digest)
        keys.append(h.digest())
    return keys


def cached_entries(cache: ScoreCache, keys: dict[RenderedKey, bytes], arrays: bool) -> dict[RenderedKey, Entry]:
    found = cache.get_many(keys.values(), arrays)
    return {w: found[k] for w, k in keys.items() if k in found}


def resolve(groups: Sequence[Group], load: Loader, render: Renderer, identity: str, cfg: GrapeConfig,
            max_length: Optional[int], cache: Optional[ScoreCache], file: str, arrays: bool) -> Resolved:  # fmt: skip
    """Render the candidates of ``groups`` (outlines) that the cache cannot answer for, and apply ``max_length``;
    cached scores are read with their per-token arrays when ``arrays``.

    With a keyed renderer, an instruction is answered from the cache when every candidate's outcome is cached (too
    long, or its rendered length) and, if it needs scores, every survivor's usable score: nothing of it is loaded
    or rendered. Any other instruction is rendered whole; its candidates not scored in the end (too long, or in an
    instruction that needs no scores) get an outcome-only entry, so that a rerun need not render them."""
    prefix = None if cache is None else render_prefix(identity, render, max_length, cfg.over_length)
    keys = {} if prefix is None else {(g.key, c.index): k for g in groups for c, k in zip(g.candidates, text_keys(prefix, g))}
    known = {} if cache is None or prefix is None else cached_entries(cache, keys, arrays)

    def answered(g: Group) -> bool:
        if not all((g.key, c.index) in known for c in g.candidates):
            return False
        fits = g.with_candidates(c for c in g.candidates if known[(g.key, c.index)].n_ids)
        return not needs_scores(fits, cfg) or all(usable(known[(g.key, c.index)], cfg) for c in fits.candidates)

    todo = {g.key for g in groups if not answered(g)}
    fresh = render_groups(load([g for g in groups if g.key in todo]), render, max_length, cfg.over_length, file)
    if cache is not None and prefix is None:
        keys = {w: item_key(identity, item) for w, item in fresh.items.items()}
        known = cached_entries(cache, keys, arrays)
    elif cache is not None:
        outcomes = [((g.key, c.index), fresh.items.get((g.key, c.index))) for g in groups if g.key in todo
                    for c in g.candidates]  # fmt: skip
        scored = {(g.key, c.index) for g in fresh.groups if needs_scores(g, cfg) for c in g.candidates}
        cache.put_many((keys[w], Entry(None, 0 if item is None else len(item.input_ids), w in fresh.cut))
                       for w, item in outcomes if w not in scored)  # fmt: skip
    kept, candidates, instructions, cut = [], Counter(), Counter(), set(fresh.cut)
    survivors = {g.key: {c.index for c in g.candidates} for g in fresh.groups}
    for g in groups:
        if g.key in todo:
            alive = survivors.get(g.key, set())
        else:
            alive = {c.index for c in g.candidates if known[(g.key, c.index)].n_ids}
            candidates["too_long"] += len(g.candidates) - len(alive)
            cut |= {(g.key, i) for i in alive if known[(g.key, i)].truncated}
            instructions["all_candidates_too_long"] += not alive
        if alive:
            kept.append(g.with_candidates(c for c in g.candidates if c.index in alive))
    drops = fresh.drops + Drops.of(candidates, instructions)
    return Resolved(tuple(kept), fresh.items, drops, frozenset(cut), known, keys)


def score(here: Resolved, scorer: Scorer, cfg: GrapeConfig, cache: Optional[ScoreCache], bar: Any,
          keep_arrays: bool) -> Share:  # fmt: skip
    """Score the candidates of every group that needs it, those the cache does not hold, appending to the cache.
    The scorer loads its weights only when something is left to score. Each score's fit is computed here; the
    per-token arrays are kept only with ``keep_arrays``."""
    from .metrics import fit_function

    fit = fit_function(cfg)
    items, known = here.items, here.known
    mine = [(g.key, c.index) for g in here.groups if needs_scores(g, cfg) for c in g.candidates]
    found = {w: kept_part(known[w].score, cfg) for w in mine if w in known and usable(known[w], cfg)}
    todo = [w for w in mine if w not in found]
    size = lambda ws: sum(here.n_ids(w) for w in ws)  # noqa: E731
    bar.total += size(todo)
    fresh: dict[RenderedKey, Score] = {}
    for chunk in commit_chunks(todo, items, COMMIT_BATCHES * cfg.batch_tokens):
        got = [kept_part(s, cfg) for s in scorer.score([items[w] for w in chunk], progress=bar.update)]
        fresh.update(zip(chunk, got))
        if cache:
            cache.put_many((here.keys[w], Entry(s, len(items[w].input_ids), w in here.cut)) for w, s in zip(chunk, got))
    scores = {**found, **fresh}
    return Share(
        list(here.groups), {w: s if keep_arrays else s.without_tokens() for w, s in scores.items()},
        {w: fit(s) for w, s in scores.items()}, here.drops, len(here.cut), len(todo), len(found), size(todo),
        size((g.key, c.index) for g in here.groups for c in g.candidates))  # fmt: skip


def score_share(groups: Sequence[Group], load: Loader, render: Renderer, scorer: Scorer, cfg: GrapeConfig,
                max_length: Optional[int], cache: Optional[ScoreCache], file: str, keep_arrays: bool,
                clock: "Stopwatch") -> Share:  # fmt: skip
    """Render and score ``groups`` a few thousand candidates at a time, so that only one chunk's texts and token
    ids are in memory at once. Per-token arrays are read from the cache when the metric needs them or they are
    kept (``keep_arrays``)."""
    from tqdm.auto import tqdm

    from .datafiles import release_memory

    arrays = keep_arrays or metric_needs_arrays(cfg)
    kept, scores, fits, drops, tally = [], {}, {}, Drops(), [0] * 5
    with tqdm(total=0, unit="tok", desc="scoring", disable=rank_world()[0] != 0) as bar:
        for chunk in group_chunks(groups, SHARE_CHUNK):
            here = resolve(chunk, load, render, scorer.identity, cfg, max_length, cache, file, arrays)
            clock.lap("render")
            part = score(here, scorer, cfg, cache, bar, keep_arrays)
            clock.lap("score")
            kept += part.groups
            scores.update(part.scores)
            fits.update(part.fits)
            drops += part.drops
            tally = [a + b for a, b in zip(tally, part.counts)]
            if here.items:
                release_memory()  # the chunk's texts and token ids
    return Share(kept, scores, fits, drops, *tally)


def gather(share: Share, groups: Sequence[Group]) -> Share:
    """Every rank's share, on every rank: outcomes, scores and fits (no texts, no token ids)."""
    if rank_world()[1] == 1:
        return share
    parts = all_gather([(share.drops, share.counts, {g.key: [c.index for c in g.candidates] for g in share.groups},
                         list(share.scores.items()), list(share.fits.items()))])  # fmt: skip
    survivors = {k: set(v) for _, _, alive, _, _ in parts for k, v in alive.items()}
    kept = [g.with_candidates(c for c in g.candidates if c.index in survivors[g.key]) for g in groups if g.key in survivors]
    return Share(kept, {w: s for p in parts for w, s in p[3]}, {w: f for p in parts for w, f in p[4]},
                 sum((p[0] for p in parts), Drops()), *map(sum, zip(*(p[1] for p in parts))))  # fmt: skip


def text_size(group: Group) -> int:
    """An estimate of a group's tokens before rendering: its characters, the prompt once per candidate."""
    return sum(c.chars for c in group.candidates)


def metric_needs_arrays(cfg: GrapeConfig) -> bool:
    from .plugins import lookup

    return bool(lookup("metrics", cfg.metric).needs)


def usable(entry: Entry, cfg: GrapeConfig) -> bool:
    """Whether a cached entry's score serves this run: it has the per-token arrays when they are kept."""
    return entry.score is not None and (entry.arrays or not cfg.keep_token_scores)


def kept_part(score: Score, cfg: GrapeConfig) -> Score:
    """A score as the run keeps it: without its per-token arrays when ``keep_token_scores`` is off."""
    return score if cfg.keep_token_scores else score.without_tokens()


def commit_chunks(todo: list[RenderedKey], items: dict[RenderedKey, Rendered], tokens: int) -> Iterator[list[RenderedKey]]:
    """Whole instructions (so the scorer can share their prompt) in chunks of about ``tokens`` tokens."""
    chunk: list[RenderedKey] = []
    size = 0
    for n, w in enumerate(todo):
        if size >= tokens and w[0] != todo[n - 1][0]:
            yield chunk
            chunk, size = [], 0
        chunk.append(w)
        size += len(items[w].input_ids)
    if chunk:
        yield chunk


def run_groups(
    grouped: Grouped,
    cfg: GrapeConfig,
    *,
    scorer: Optional[Scorer] = None,
    renderer: Optional[Renderer] = None,
    file: str = "input",
    token_scores: bool = False,
) -> Selection:
    """Render, score and select ``grouped``. A host passes its own ``renderer`` and ``scorer``; without them the
    configured template and scorer are used (and the scorer is closed afterwards). Under ``torch.distributed``
    each rank loads, renders and scores its own instructions (balanced by size); only outcomes, scores and fits
    are gathered. The selection's scores keep their per-token arrays only with ``token_scores`` (to compare
    metrics afterwards)."""
    from .metrics import check_metric

    started = time.perf_counter()
    check_metric(cfg)
    own_scorer = scorer is None
    scorer = scorer or make_scorer(cfg)
    clock = Stopwatch()
    try:
        max_length = cfg.max_length or scorer.context_length  # past the model's positions scores mean nothing
        cache = open_cache(cfg.cache_dir, scorer.identity, rank_world()[0])
        try:
            render, mine = renderer or make_renderer(scorer, cfg), shard(grouped.groups, text_size)
            share = agreed(lambda: score_share(mine, grouped.load, render, scorer, cfg, max_length, cache, file,
                                               token_scores, clock))  # fmt: skip
        finally:
            if cache:
                cache.close()
        everything = gather(share, grouped.groups)
        loaded = scorer.loaded
    finally:
        if own_scorer:
            scorer.close()
    clock.lap("gather")
    kept, not_kept = choose(everything.groups, everything.fits, cfg)
    clock.lap("select")
    stats = Stats(
        instructions=len(grouped.groups) + grouped.drops.n_instructions,
        candidates=sum(len(g.candidates) for g in grouped.groups) + grouped.drops.n_candidates,
        truncated=everything.truncated,
        scored=everything.scored,
        cached=everything.cached,
        tokens_scored=everything.tokens_scored,
        tokens=everything.tokens,
        tokens_here=share.tokens,
        scored_by_this_rank=share.scored,
        model_loaded=loaded,
        seconds=round(time.perf_counter() - started, 2),
        stages=clock.laps,
    )
    return Selection(tuple(everything.groups), everything.scores, kept, grouped.drops + everything.drops + not_kept,
                     stats, grouped.skipped, cfg.metric, everything.fits, grouped.load, grouped.reading)  # fmt: skip


def run(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None, **kwargs: Any) -> tuple[FileInput, Selection]:
    """Read a file and select from it (see ``run_groups``)."""
    data = read(path, cfg, limit)
    return data, run_groups(data.grouped, cfg, file=str(data.path), **kwargs)


def write(data: FileInput, selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """Write ``selected.*`` (the input's shape) and the report files (``write_report``) into ``out_dir``."""
    from .datafiles import write_dataset

    out, source = Path(out_dir).resolve(), data.path.resolve()
    if out == source or source.is_relative_to(out):
        raise GrapeError(f"-o {out_dir}: the output folder holds the input {data.path}; choose another folder")
    if out.exists() and not out.is_dir():
        raise GrapeError(f"-o {out_dir}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return {"selected": write_dataset(data.selected(selection), out, "selected", data.path), **write_report(selection, out)}


def score_rows(selection: Selection) -> Iterator[dict[str, Any]]:
    """One ``scores.jsonl`` row per candidate, in group order, made as they are written (no table is built)."""
    for g in selection.groups:
        kept = set(selection.kept.get(g.key, ()))
        for c in g.candidates:
            s = selection.scores.get((g.key, c.index))
            yield {
                "group": g.key,
                "index": c.index,
                "part": c.part,
                "row": c.row,
                "source": c.source,
                "score": None if s is None else s.mean,
                "fit": selection.fits.get((g.key, c.index)),
                "logprob_sum": None if s is None else s.logprob_sum,
                "n_tokens": None if s is None else s.n_tokens,
                "selected": c.index in kept,
            }


def write_report(selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """``scores.jsonl`` (one row per candidate), ``report.json`` (the summary) and ``report.html`` (charts and a
    browsable table) in ``out_dir``; every host calls this. The candidates are gone through twice: once to stream
    scores.jsonl, once to tally what the summary and the page need (``report.Tally``)."""
    from .report import Tally, score_line, summary
    from .report_html import write_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out / "scores.jsonl", "report": out / "report.json"}
    with open(paths["scores"], "w", encoding="utf-8", buffering=1 << 20) as fh:
        fh.writelines(map(score_line, score_rows(selection)))
    tally = Tally.of(selection)
    paths["report"].write_text(json.dumps(summary(selection, tally), indent=2, ensure_ascii=False) + "\n")
    paths["html"] = write_html(selection, out / "report.html", tally)
    return paths
