"""The one way through: read + group -> render -> score -> select -> write -> report.

``run_groups`` is the path every host takes (the CLI's files, Axolotl, LLaMA-Factory, notebooks): a host only
says where the groups come from, how a candidate is rendered and how the scoring model loads (see ``host.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .cache import Entry, ScoreCache, item_key, open_cache
from .config import GrapeConfig
from .distributed import agreed, all_gather, rank_world, shard
from .errors import GrapeError
from .formats import Context, Format, Input, detect_format, group_rows
from .plugins import lookup, registry
from .records import Drops, Group, Grouped, Score, Selection, Stats, prompt_key
from .render import Rendered, RenderedGroups, RenderedKey, Renderer, render_groups
from .scoring import Scorer
from .selection import choose, needs_scores

COMMIT_BATCHES = 8  # about this many full batches are scored between two cache commits


@dataclass(frozen=True)
class FileInput:
    """Groups read from one file, with what is needed to write a selection back in the same shape."""

    path: Path
    dataset: Any
    format: Format
    context: Context
    grouped: Grouped

    @property
    def groups(self) -> tuple:
        return self.grouped.groups

    def selected(self, selection: Selection) -> Any:
        """The kept rows as a ``datasets.Dataset`` in the input's shape."""
        return self.format.selected(self.dataset, selection.picks(), self.context)


def read(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None) -> FileInput:
    """Read a file and group its candidates; ``limit`` keeps the first N instructions."""
    from .datafiles import read_dataset

    path = Path(path)
    dataset = read_dataset(path, cfg.split)
    ctx = Context(str(path), list(dataset.column_names), cfg)
    fmt = detect_format(ctx, registry("formats"))
    return FileInput(path, dataset, fmt, ctx, group_rows([Input(dataset, fmt, ctx)], cfg.min_candidates, limit))


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
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


@dataclass(frozen=True)
class Resolved:
    """This rank's candidates after ``max_length``: rendered (``rendered.items``) or known from the cache
    (``known``: their outcome and score, with no need to render them), and each one's cache key."""

    rendered: RenderedGroups
    known: dict[RenderedKey, Entry]
    keys: dict[RenderedKey, bytes]

    def n_ids(self, w: RenderedKey) -> int:
        item = self.rendered.items.get(w)
        return self.known[w].n_ids if item is None else len(item.input_ids)


@dataclass(frozen=True)
class Scored:
    """Every wanted candidate's score, and how they were obtained."""

    scores: dict[RenderedKey, Score]
    scored: int
    cached: int
    tokens_scored: int
    tokens: int  # every wanted candidate's (all ranks)
    tokens_here: int  # the candidates this rank holds rendered
    scored_by_this_rank: int


def render_prefix(identity: str, render: Renderer, max_length: Optional[int], over_length: str) -> Optional[str]:
    """What every cache key of a renderer with a ``key`` starts with: all a candidate's tokens depend on but its
    own text (None for a renderer without a key: its candidates are keyed by their token ids, once rendered)."""
    key = getattr(render, "key", None)
    return None if key is None else f"{identity}\n{key}\n{max_length}\n{over_length}\n"


def text_keys(prefix: str, group: Group) -> list[bytes]:
    """The cache key of each candidate, from its text and its instruction's (prompt and context)."""
    head = hashlib.sha256(f"{prefix}{prompt_key(group.prompt, group.context)}\n".encode())
    keys = []
    for cand in group.candidates:
        h = head.copy()
        h.update(cand.response.encode())
        keys.append(h.digest())
    return keys


def cached_entries(cache: ScoreCache, keys: dict[RenderedKey, bytes]) -> dict[RenderedKey, Entry]:
    found = cache.get_many(keys.values())
    return {w: found[k] for w, k in keys.items() if k in found}


def resolve(groups: Sequence[Group], render: Renderer, identity: str, cfg: GrapeConfig, max_length: Optional[int],
            cache: Optional[ScoreCache], file: str) -> Resolved:  # fmt: skip
    """Render the candidates of ``groups`` that the cache cannot answer for, and apply ``max_length``.

    With a keyed renderer, an instruction is answered from the cache when every candidate's outcome is cached (too
    long, or its rendered length) and, if it needs scores, every survivor's usable score: nothing of it is
    rendered. Any other instruction is rendered whole; its candidates not scored in the end (too long, or in an
    instruction that needs no scores) get an outcome-only entry, so that a rerun need not render them."""
    prefix = None if cache is None else render_prefix(identity, render, max_length, cfg.over_length)
    if prefix is None:
        rendered = render_groups(groups, render, max_length, cfg.over_length, file)
        if cache is None:
            return Resolved(rendered, {}, {})
        keys = {w: item_key(identity, item) for w, item in rendered.items.items()}
        return Resolved(rendered, cached_entries(cache, keys), keys)
    keys = {(g.key, c.index): k for g in groups for c, k in zip(g.candidates, text_keys(prefix, g))}
    known = cached_entries(cache, keys)

    def answered(g: Group) -> bool:
        fits = g.with_candidates(c for c in g.candidates if known[(g.key, c.index)].n_ids)
        return not needs_scores(fits, cfg) or all(usable(known[(g.key, c.index)].score, cfg) for c in fits.candidates)

    todo = {g.key for g in groups if not all((g.key, c.index) in known for c in g.candidates) or not answered(g)}
    fresh = render_groups([g for g in groups if g.key in todo], render, max_length, cfg.over_length, file)
    outcomes = [((g.key, c.index), fresh.items.get((g.key, c.index))) for g in groups if g.key in todo
                for c in g.candidates]  # fmt: skip
    scored = {(g.key, c.index) for g in fresh.groups if needs_scores(g, cfg) for c in g.candidates}
    cache.put_many((keys[w], Entry(None, 0 if item is None else len(item.input_ids), w in fresh.cut))
                   for w, item in outcomes if w not in scored)  # fmt: skip
    kept, candidates, instructions, cut = [], Counter(), Counter(), set(fresh.cut)
    by_key = {g.key: g for g in fresh.groups}
    for g in groups:
        if g.key in todo:
            kept += [by_key[g.key]] if g.key in by_key else []
            continue
        fits = g.with_candidates(c for c in g.candidates if known[(g.key, c.index)].n_ids)
        candidates["too_long"] += len(g.candidates) - len(fits.candidates)
        cut |= {(g.key, c.index) for c in fits.candidates if known[(g.key, c.index)].truncated}
        if fits.candidates:
            kept.append(fits)
        else:
            instructions["all_candidates_too_long"] += 1
    drops = fresh.drops + Drops.of(candidates, instructions)
    return Resolved(RenderedGroups(tuple(kept), fresh.items, drops, len(cut), frozenset(cut)), known, keys)


def score(here: Resolved, scorer: Scorer, cfg: GrapeConfig, cache: Optional[ScoreCache]) -> Scored:
    """Score the candidates of every group that needs it, those the cache does not hold, appending to the cache.

    Under ``torch.distributed`` each rank passes its own share of the instructions (see ``run_groups``) and every
    rank gets all scores. The scorer loads its weights only if this rank has something left to score.
    """
    from tqdm.auto import tqdm

    items, known = here.rendered.items, here.known
    mine = [(g.key, c.index) for g in here.rendered.groups if needs_scores(g, cfg) for c in g.candidates]
    found = {w: kept_part(known[w].score, cfg) for w in mine if w in known and usable(known[w].score, cfg)}
    todo = [w for w in mine if w not in found]
    fresh_here: list[tuple[RenderedKey, Score]] = []
    size = lambda ws: sum(here.n_ids(w) for w in ws)  # noqa: E731
    with tqdm(total=size(todo), unit="tok", desc="scoring", disable=not todo or rank_world()[0] != 0) as bar:
        for chunk in commit_chunks(todo, items, COMMIT_BATCHES * cfg.batch_tokens):
            fresh = [kept_part(s, cfg) for s in scorer.score([items[w] for w in chunk], progress=bar.update)]
            fresh_here += zip(chunk, fresh)
            if cache:
                cache.put_many((here.keys[w], Entry(s, len(items[w].input_ids), w in here.rendered.cut))
                               for w, s in zip(chunk, fresh))  # fmt: skip
    scores = dict(all_gather([*found.items(), *fresh_here]))
    n_here = size((g.key, c.index) for g in here.rendered.groups for c in g.candidates)
    n_todo, n_mine, tokens_todo, tokens = map(sum, zip(*all_gather([(len(todo), len(mine), size(todo), n_here)])))
    return Scored(scores, n_todo, n_mine - n_todo, tokens_todo, tokens, n_here, len(todo))


def gather_rendered(groups: Sequence[Group], rendered: RenderedGroups) -> RenderedGroups:
    """Every rank's rendering outcome over all ``groups`` (survivors, drops, truncations), without the token ids:
    each rank keeps only its own."""
    if rank_world()[1] == 1:
        return rendered
    survivors = dict(all_gather([(g.key, {c.index for c in g.candidates}) for g in rendered.groups]))
    outcome = all_gather([(rendered.drops, rendered.truncated)])
    kept = tuple(g.with_candidates(c for c in g.candidates if c.index in survivors[g.key])
                 for g in groups if g.key in survivors)  # fmt: skip
    return RenderedGroups(kept, rendered.items, sum((d for d, _ in outcome), Drops()), sum(t for _, t in outcome))


def text_size(group: Group) -> int:
    """An estimate of a group's tokens before rendering: its characters, the prompt once per candidate."""
    prompt = sum(len(m["content"]) for m in group.prompt)
    return sum(prompt + len(c.response) for c in group.candidates)


def usable(score: Optional[Score], cfg: GrapeConfig) -> bool:
    """Whether a cached score serves this run: it has the per-token arrays when they are kept."""
    return score is not None and (score.token_logprobs is not None or not cfg.keep_token_scores)


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
) -> Selection:
    """Render, score and select ``grouped``. A host passes its own ``renderer`` and ``scorer``; without them the
    configured template and scorer are used (and the scorer is closed afterwards)."""
    from .metrics import check_metric, fit_values

    started = time.perf_counter()
    check_metric(cfg)
    own_scorer = scorer is None
    scorer = scorer or make_scorer(cfg)
    clock = Stopwatch()
    try:
        max_length = cfg.max_length or scorer.context_length  # past the model's positions scores mean nothing
        # each rank renders and scores its own instructions; only the outcome and the scores are gathered
        cache = open_cache(cfg.cache_dir, scorer.identity, rank_world()[0])
        try:
            render, mine = renderer or make_renderer(scorer, cfg), shard(grouped.groups, text_size)
            here = agreed(lambda: resolve(mine, render, scorer.identity, cfg, max_length, cache, file))
            clock.lap("render")
            scored = score(here, scorer, cfg, cache)
        finally:
            if cache:
                cache.close()
        rendered = gather_rendered(grouped.groups, here.rendered)
        clock.lap("score")
        loaded = scorer.loaded
    finally:
        if own_scorer:
            scorer.close()
    fits = fit_values(scored.scores, cfg)
    kept, not_kept = choose(rendered.groups, fits, cfg)
    clock.lap("select")
    drops = grouped.drops + rendered.drops + not_kept
    stats = Stats(
        instructions=len(grouped.groups) + grouped.drops.n_instructions,
        candidates=sum(len(g.candidates) for g in grouped.groups) + grouped.drops.n_candidates,
        truncated=rendered.truncated,
        scored=scored.scored,
        cached=scored.cached,
        tokens_scored=scored.tokens_scored,
        tokens=scored.tokens,
        tokens_here=scored.tokens_here,
        scored_by_this_rank=scored.scored_by_this_rank,
        model_loaded=loaded,
        seconds=round(time.perf_counter() - started, 2),
        stages=clock.laps,
    )
    return Selection(rendered.groups, scored.scores, kept, drops, stats, grouped.skipped, cfg.metric, fits)


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
