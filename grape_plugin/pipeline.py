"""The one way through: read + group -> render -> score -> select -> write -> report.

The CLI, notebooks and the host integrations all call these functions; a host only changes where rows come
from, how they are rendered (its own tokens and labels) and where the selection goes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .cache import item_key, open_cache
from .candidates import Candidate, Drops, Group
from .config import GrapeConfig
from .errors import GrapeError, input_error
from .formats import Context, Format, detect_format, group_rows
from .plugins import lookup, registry
from .render import Rendered, Renderer, fit_length
from .scoring import Score, Scorer
from .selection import apply_budget

COMMIT_BATCHES = 8  # about this many full batches are scored between two cache commits


@dataclass
class Candidates:
    """Groups read from one file, with what is needed to write a selection back in the same shape."""

    path: Path
    dataset: Any
    format: Format
    context: Context
    groups: list[Group]
    drops: Drops


@dataclass
class Selection:
    """Scores, kept candidates and the ledger of one run."""

    groups: list[Group]
    scores: dict[tuple[str, int], Score]
    kept: dict[str, list[int]]  # group key -> kept candidate indices, best first
    drops: Drops
    stats: dict[str, Any] = field(default_factory=dict)

    def picks(self) -> list[tuple[Group, Candidate]]:
        # look candidates up by index: render_groups may have removed too-long ones, shifting positions
        by_index = {g.key: (g, {c.index: c for c in g.candidates}) for g in self.groups}
        return [(by_index[k][0], by_index[k][1][i]) for k, idx in self.kept.items() for i in idx]


def read(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None) -> Candidates:
    """Read a file and group its candidates; ``limit`` keeps the first N instructions."""
    from .datafiles import read_dataset

    path = Path(path)
    dataset = read_dataset(path)
    ctx = Context(str(path), list(dataset.column_names), cfg)
    fmt = detect_format(ctx, registry("formats"))
    drops = Drops()
    groups = group_rows(iter(dataset), fmt, ctx, drops, limit)
    return Candidates(path, dataset, fmt, ctx, groups, drops)


def needs_scores(group: Group, cfg: GrapeConfig) -> bool:
    """A group whose candidates all survive (and no budget ranks it) needs no forward pass."""
    return len(group.candidates) > cfg.top_k or cfg.budget is not None or cfg.budget_fraction is not None


def render_groups(
    groups: list[Group], render: Renderer, cfg: GrapeConfig, drops: Drops, file: str = "input"
) -> tuple[list[Group], dict[tuple[str, int], Rendered]]:
    """Render every candidate; apply ``max_length`` (drop or truncate, counted); drop emptied groups."""
    rendered: dict[tuple[str, int], Rendered] = {}
    kept_groups = []
    for group in groups:
        survivors = []
        for cand in group.candidates:
            try:
                item = render(group.prompt, cand.response)
            except GrapeError as exc:
                raise input_error(file, cand.row, "response", str(exc)) from None
            fitted = fit_length(item, cfg.max_length, cfg.over_length)
            if fitted is None:
                drops.candidate("too_long")
                continue
            if fitted is not item:
                drops["truncated"] += 1
            rendered[(group.key, cand.index)] = fitted
            survivors.append(cand)
        if survivors:
            group.candidates = survivors
            kept_groups.append(group)
        else:
            drops.instruction("all_candidates_too_long")
    return kept_groups, rendered


def score(
    groups: list[Group],
    rendered: dict[tuple[str, int], Rendered],
    scorer: Scorer,
    cfg: GrapeConfig,
    stats: dict[str, Any],
) -> dict[tuple[str, int], Score]:
    """Score the candidates of every group that needs it, through the on-disk cache.

    Under ``torch.distributed`` each rank scores its share of the instructions and every rank gets all scores.
    """
    from tqdm.auto import tqdm

    from .distributed import all_gather, rank_world, shard

    wanted = [(g.key, c.index) for g in groups if needs_scores(g, cfg) for c in g.candidates]
    cache = open_cache(cfg.cache_dir, scorer.identity)
    keys = {w: item_key(scorer.identity, rendered[w]) for w in wanted}
    cached = cache.get_many(list(keys.values())) if cache else {}
    scores = {w: cached[keys[w]] for w in wanted if keys[w] in cached}
    todo = [w for w in wanted if w not in scores]
    stats.update(scored=len(todo), cached=len(scores), tokens_scored=sum(len(rendered[w].input_ids) for w in todo))
    mine = shard(todo, key=lambda w: w[0])
    stats["scored_by_this_rank"] = len(mine)
    fresh_here: list[tuple[tuple[str, int], Score]] = []
    total = sum(len(rendered[w].input_ids) for w in mine)
    with tqdm(total=total, unit="tok", desc="scoring", disable=not mine or rank_world()[0] != 0) as bar:
        for chunk in commit_chunks(mine, rendered, COMMIT_BATCHES * cfg.batch_tokens):
            fresh = scorer.score([rendered[w] for w in chunk], progress=bar.update)
            fresh_here += zip(chunk, fresh)
            if cache:
                cache.put_many((keys[w], s) for w, s in zip(chunk, fresh))
    if cache:
        cache.close()
    scores.update(all_gather(fresh_here))
    return scores


def commit_chunks(
    todo: list[tuple[str, int]], rendered: dict[tuple[str, int], Rendered], tokens: int
) -> Iterator[list[tuple[str, int]]]:
    """Whole instructions (so the scorer can share their prompt) in chunks of about ``tokens`` tokens."""
    chunk: list[tuple[str, int]] = []
    size = 0
    for n, w in enumerate(todo):
        if size >= tokens and w[0] != todo[n - 1][0]:
            yield chunk
            chunk, size = [], 0
        chunk.append(w)
        size += len(rendered[w].input_ids)
    if chunk:
        yield chunk


def select(
    groups: list[Group], scores: dict[tuple[str, int], Score], cfg: GrapeConfig, drops: Drops
) -> dict[str, list[int]]:
    """Kept candidate indices per group key, after the strategy and the budget."""
    selector = lookup("selectors", cfg.strategy)
    kept: dict[str, list[int]] = {}
    fits: list[tuple[str, float]] = []
    for g in groups:
        if not needs_scores(g, cfg):
            kept[g.key] = [c.index for c in g.candidates]
            continue
        means = [scores[(g.key, c.index)].mean for c in g.candidates]
        picked = selector.pick(means, cfg.top_k, g.key, cfg.seed)
        kept[g.key] = [g.candidates[p].index for p in picked]
        fits.append((g.key, sum(means[p] for p in picked) / len(picked)))
        drops.candidate("not_selected", len(g.candidates) - len(picked))
    in_budget = apply_budget(fits, cfg.budget, cfg.budget_fraction, selector.budget_sign)
    if in_budget is not None:
        for key in [k for k, _ in fits if k not in in_budget]:
            drops.instruction("over_budget")
            drops.candidate("over_budget", len(kept.pop(key)))
    return kept


def make_renderer(scorer: Scorer, cfg: GrapeConfig) -> Renderer:
    """The named template (``cfg.template``) built on the scorer's tokenizer."""
    return lookup("renderers", cfg.template)(scorer.tokenizer, cfg)


def run_groups(
    groups: list[Group],
    cfg: GrapeConfig,
    drops: Drops,
    *,
    scorer: Optional[Scorer] = None,
    renderer: Optional[Renderer] = None,
    file: str = "input",
) -> Selection:
    """Render, score and select ``groups``; a host passes its own ``renderer`` and, if it has one, ``scorer``."""
    started = time.perf_counter()
    stats: dict[str, Any] = {
        "instructions": len(groups) + sum(v for k, v in drops.items() if k.startswith("instruction:")),
        "candidates_in": sum(len(g.candidates) for g in groups) + sum(v for k, v in drops.items() if k.startswith("candidate:")),
    }
    own_scorer = scorer is None
    scorer = scorer or lookup("scorers", cfg.scorer)(cfg)
    try:
        render = renderer or make_renderer(scorer, cfg)
        groups, rendered = render_groups(groups, render, cfg, drops, file)
        scores = score(groups, rendered, scorer, cfg, stats)
    finally:
        if own_scorer:
            scorer.close()
    kept = select(groups, scores, cfg, drops)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return Selection(groups, scores, kept, drops, stats)


def run(path: str | Path, cfg: GrapeConfig, limit: Optional[int] = None, **kwargs: Any) -> tuple[Candidates, Selection]:
    """Read a file and select from it (see ``run_groups``)."""
    data = read(path, cfg, limit)
    return data, run_groups(data.groups, cfg, data.drops, file=str(data.path), **kwargs)


def write(data: Candidates, selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """Write ``selected.*`` (the input's shape) and the report files (``write_report``) into ``out_dir``."""
    from .datafiles import write_dataset

    out, source = Path(out_dir).resolve(), data.path.resolve()
    if out == source or source.is_relative_to(out):
        raise GrapeError(f"-o {out_dir}: the output folder holds the input {data.path}; choose another folder")
    if out.exists() and not out.is_dir():
        raise GrapeError(f"-o {out_dir}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    selected = data.format.selected(data.dataset, selection.picks(), data.context)
    return {"selected": write_dataset(selected, out, "selected", data.path), **write_report(selection, out)}


def write_report(selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """``scores.jsonl`` (one row per candidate), ``report.json`` (the summary) and ``report.html`` (charts and a
    browsable table) in ``out_dir``; every host calls this."""
    from .report import summary
    from .report_html import write_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = {(k, i) for k, idx in selection.kept.items() for i in idx}
    paths = {"scores": out / "scores.jsonl", "report": out / "report.json"}
    with open(paths["scores"], "w", encoding="utf-8") as fh:
        for g in selection.groups:
            for c in g.candidates:
                s = selection.scores.get((g.key, c.index))
                row = {
                    "group": g.key,
                    "index": c.index,
                    "row": c.row,
                    "source": c.source,
                    "score": None if s is None else s.mean,
                    "logprob_sum": None if s is None else s.logprob_sum,
                    "n_tokens": None if s is None else s.n_tokens,
                    "selected": (g.key, c.index) in kept,
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["report"].write_text(json.dumps(summary(selection), indent=2, ensure_ascii=False) + "\n")
    paths["html"] = write_html(selection, out / "report.html")
    return paths
