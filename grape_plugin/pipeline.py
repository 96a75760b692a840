"""The one way through for the instructions of a run: render -> score -> select, a chunk at a time, each rank its
own share; the next chunk is read, rendered and looked up in the cache while the scorer works on the current one.
Reading and grouping is ``formats.py``, writing ``output.py``, and ``host.py`` drives it all for every host (the
CLI's files, Axolotl, LLaMA-Factory, notebooks).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .cache import Entry, ScoreCache, cached_entries, item_key, kept_part, open_cache, render_prefix, text_keys, usable
from .components import SCORER, Components, conform
from .config import GrapeConfig
from .distributed import agreed, gather, rank_world, shard
from .records import Drops, Grouped, GroupOutline, Loader, Reason, Results, Score, Selection, Share, Stats
from .render import Rendered, RenderedKey, Renderer, group_chunks, render_groups
from .scoring import Done, Scorer
from .selection import choose, needs_scores
from .version import __version__

SHARE_CHUNK = 4096  # candidates loaded, rendered and scored at a time (one score call each)


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
class RunContext:
    """What the stages of one run share: its components (options included), the scorer and renderer, the score
    cache, the clock, the input's name for messages, the effective ``max_length``, and whether the selection's
    scores keep their per-token arrays (``keep_arrays``)."""

    parts: Components
    scorer: Scorer
    render: Renderer
    cache: Optional[ScoreCache]
    clock: Stopwatch
    file: str
    max_length: Optional[int]
    keep_arrays: bool = False

    @property
    def cfg(self) -> GrapeConfig:
        return self.parts.cfg

    @property
    def arrays(self) -> bool:
        """Whether cached scores are read with their per-token arrays: the metric needs them, or they are kept."""
        return self.keep_arrays or bool(self.parts.metric.needs)


@dataclass(frozen=True)
class Resolved:
    """Some instructions after ``max_length``, as outlines (``groups``), with the token ids of those rendered
    (``items``; the others are answered by the cache: ``known``), and each candidate's cache key."""

    groups: tuple[GroupOutline, ...]
    items: dict[RenderedKey, Rendered]
    drops: Drops
    cut: frozenset[RenderedKey]  # truncated at max_length
    known: dict[RenderedKey, Entry]
    keys: dict[RenderedKey, bytes]

    def n_ids(self, w: RenderedKey) -> int:
        item = self.items.get(w)
        return self.known[w].n_ids if item is None else len(item.input_ids)



def resolve(groups: Sequence[GroupOutline], load: Loader, run: RunContext) -> Resolved:
    """Render the candidates of ``groups`` (outlines) that the cache cannot answer for, and apply ``max_length``.

    With a keyed renderer, an instruction is answered from the cache when every candidate's outcome is cached (too
    long, or its rendered length) and, if it needs scores, every survivor's usable score: nothing of it is loaded
    or rendered. Any other instruction is rendered whole; its candidates not scored in the end (too long, or in an
    instruction that needs no scores) get an outcome-only entry, so that a rerun need not render them."""
    cfg, cache, identity = run.cfg, run.cache, run.scorer.identity
    prefix = None if cache is None else render_prefix(identity, run.render, run.max_length, cfg.over_length)
    keys = {} if prefix is None else {(g.key, c.index): k for g in groups for c, k in zip(g.candidates, text_keys(prefix, g))}
    known = {} if cache is None or prefix is None else cached_entries(cache, keys, run.arrays)

    def answered(g: GroupOutline) -> bool:
        if not all((g.key, c.index) in known for c in g.candidates):
            return False
        fits = g.with_candidates(c for c in g.candidates if known[(g.key, c.index)].n_ids)
        return not needs_scores(fits, cfg) or all(usable(known[(g.key, c.index)], cfg.keep_token_scores)
                                                   for c in fits.candidates)  # fmt: skip

    todo = {g.key for g in groups if not answered(g)}
    fresh = render_groups(load([g for g in groups if g.key in todo]), run.render, run.max_length, cfg.over_length,
                          run.file)  # fmt: skip
    if cache is not None and prefix is None:
        keys = {w: item_key(identity, item) for w, item in fresh.items.items()}
        known = cached_entries(cache, keys, run.arrays)
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
            candidates[Reason.TOO_LONG] += len(g.candidates) - len(alive)
            cut |= {(g.key, i) for i in alive if known[(g.key, i)].truncated}
            instructions[Reason.ALL_CANDIDATES_TOO_LONG] += not alive
        if alive:
            kept.append(g.with_candidates(c for c in g.candidates if c.index in alive))
    drops = fresh.drops + Drops.of(candidates, instructions)
    return Resolved(tuple(kept), fresh.items, drops, frozenset(cut), known, keys)


def score(here: Resolved, run: RunContext, bar: Any) -> Share:
    """Score the candidates of every group that needs it, those the cache does not hold, in one score call; each
    batch's scores reach the cache as the scorer finishes it. The scorer loads its weights (timed as the ``load``
    stage) only when something is left to score. Each score's fit is computed here; the per-token arrays are kept
    only with ``run.keep_arrays``."""
    cfg, cache, fit, keep = run.cfg, run.cache, run.parts.fit, run.cfg.keep_token_scores
    items, known = here.items, here.known
    mine = [(g.key, c.index) for g in here.groups if needs_scores(g, cfg) for c in g.candidates]
    found = {w: kept_part(known[w].score, keep) for w in mine if w in known and usable(known[w], keep)}
    todo = [w for w in mine if w not in found]
    size = lambda ws: sum(here.n_ids(w) for w in ws)  # noqa: E731
    bar.total += size(todo)

    fresh: dict[RenderedKey, Score] = {}

    def commit(indices: Sequence[int], got: Sequence[Score]) -> None:
        done = {todo[i]: kept_part(s, keep) for i, s in zip(indices, got)}
        fresh.update(done)
        if cache:
            cache.put_many((here.keys[w], Entry(s, len(items[w].input_ids), w in here.cut)) for w, s in done.items())

    if todo:
        run.scorer.load()
        run.clock.lap("load")
        score_items(run.scorer, [items[w] for w in todo], bar.update, commit)
    scores = {**found, **{w: fresh[w] for w in todo}}
    results = Results.of((w, s if run.keep_arrays else s.without_tokens(), fit(s)) for w, s in scores.items())
    return Share(list(here.groups), results, here.drops, len(here.cut), len(todo), len(found), size(todo),
                 size((g.key, c.index) for g in here.groups for c in g.candidates))  # fmt: skip


def score_items(scorer: Scorer, items: list[Rendered], progress: Callable[[int], None], commit: Done) -> None:
    """``scorer.score(items)``, each batch's scores handed to ``commit(indices, scores)`` as the scorer finishes
    it; what it did not hand over (a scorer without ``done``) is committed when it returns."""
    committed: set[int] = set()

    def done(indices: Sequence[int], got: Sequence[Score]) -> None:
        committed.update(indices)
        commit(indices, got)

    got = scorer.score(items, progress=progress, done=done)
    rest = [i for i in range(len(items)) if i not in committed]
    if rest:
        commit(rest, [got[i] for i in rest])


def score_share(groups: Sequence[GroupOutline], load: Loader, run: RunContext) -> Share:
    """Render and score ``groups`` a few thousand candidates at a time, so that at most two chunks' texts and token
    ids are in memory at once: while the scorer works on one chunk, a worker thread reads, renders and looks up the
    next (the tokenizer and torch release the GIL). The ``render`` stage is the time the scorer waited for it."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .datafiles import release_memory

    kept, results, drops, tally = [], Results(), Drops(), [0] * 5
    chunks = group_chunks(groups, SHARE_CHUNK)
    # disable=None: tqdm shows the bar only on a terminal, so logs get none
    with tqdm(total=0, unit="tok", desc="scoring", disable=True if rank_world()[0] else None) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="grape-render") as worker:  # fmt: skip

        def ahead() -> Optional[Future[Resolved]]:
            chunk = next(chunks, None)
            return None if chunk is None else worker.submit(resolve, chunk, load, run)

        coming = ahead()
        while coming is not None:
            here = coming.result()
            coming = ahead()
            run.clock.lap("render")
            part = score(here, run, bar)
            run.clock.lap("score")
            kept += part.groups
            results += part.results
            drops += part.drops
            tally = [a + b for a, b in zip(tally, part.counts)]
            if here.items:
                del here, part
                worker.submit(release_memory)  # the chunk's texts and token ids, given back while the next is scored
    return Share(kept, results, drops, *tally)


def text_size(group: GroupOutline) -> int:
    """An estimate of a group's tokens before rendering: its characters, the prompt once per candidate."""
    return sum(c.chars for c in group.candidates)


def made_by(parts: Components, scorer: Scorer) -> dict[str, Any]:
    """What made a selection: grape-plugin's version, the model (name, revision, weights identity, dtype, device),
    the template, the metric and every option."""
    cfg = parts.cfg
    return {"grape_plugin": __version__, "model": {**scorer.about, "identity": scorer.identity},
            "template": cfg.template, "metric": cfg.metric, "strategy": cfg.strategy,
            "options": cfg.model_dump(mode="json")}  # fmt: skip


def run_groups(
    grouped: Grouped,
    parts: GrapeConfig | Components,
    *,
    scorer: Optional[Scorer] = None,
    renderer: Optional[Renderer] = None,
    file: str = "input",
    token_scores: bool = False,
) -> Selection:
    """Render, score and select ``grouped`` with the options (or the components resolved from them) ``parts``. A
    host passes its own ``renderer`` and ``scorer``; without them the configured template and scorer are used (and
    the scorer is closed afterwards). Under ``torch.distributed`` each rank loads, renders and scores its own
    instructions (balanced by size); only outcomes, scores and fits are gathered. The selection's scores keep their
    per-token arrays only with ``token_scores`` (to compare metrics afterwards)."""
    started = time.perf_counter()
    parts = parts if isinstance(parts, Components) else Components.of(parts)
    cfg, own_scorer, clock = parts.cfg, scorer is None, Stopwatch()
    scorer = parts.make_scorer() if scorer is None else conform(scorer, SCORER, "the given scorer")
    try:
        cache = open_cache(cfg.cache_dir, scorer.identity, rank_world()[0])
        run = RunContext(parts, scorer, renderer or parts.make_renderer(scorer), cache, clock, file,
                         cfg.max_length or scorer.context_length, token_scores)  # past the model's positions, scores mean nothing
        try:
            share = agreed(lambda: score_share(shard(grouped.groups, text_size), grouped.load, run))
        finally:
            if cache:
                cache.close()
        everything = gather(share, grouped.groups)
        loaded = scorer.loaded
    finally:
        if own_scorer:
            scorer.close()
    clock.lap("gather")
    kept, not_kept = choose(everything.groups, everything.results.fits, parts.selector, cfg)
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
    return Selection(tuple(everything.groups), everything.results, kept, grouped.drops + everything.drops + not_kept,
                     stats, grouped.skipped, cfg.metric, grouped.load, made_by(parts, scorer), grouped.reading)  # fmt: skip
