"""What a run did, for people: a summary (JSON and terminal) and the per-instruction preview."""

from __future__ import annotations

import json
import math
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any, Mapping, Optional

from .components import Components
from .errors import GrapeError
from .records import Selection


NOTHING_COMPARED = (
    "no instruction has two or more candidates, so nothing was compared and nothing was selected by fit; "
    "if rows of one instruction carry different ids, group them by prompt (--group-by prompt)"
)


@dataclass(frozen=True)
class Tally:
    """What the summary and the charts need of every candidate, gathered in one pass over the groups: counts and
    compact numpy columns (one entry per scored candidate, in group order), no per-candidate Python objects."""

    compared: int  # instructions with two or more candidates
    wins: Counter  # kept candidates per source of those instructions, in the order of ``kept``
    single: int  # instructions with one candidate: kept without a comparison, so no win
    offered: Counter  # candidates per source in the instructions compared (those ``wins`` counts)
    sources: tuple[str, ...]  # source names ("(none)" for no source); ``source`` indexes them
    source: Any  # C int
    score: Any  # float64: mean log-prob
    tokens: Any  # int64
    won: Any  # bool: kept
    gaps: Any  # float64: per instruction with two or more scored candidates, best minus second-best score
    means: Any  # float64: every score's mean (``selection.scores``)

    @classmethod
    def of(cls, selection: Selection) -> "Tally":
        import numpy as np

        codes: dict[str, int] = {}
        counts: list[int] = []
        source, score, tokens, won, gaps = array("i"), array("d"), array("q"), array("b"), array("d")
        compared, scores = 0, selection.scores
        for g in selection.groups:
            kept_set = set(selection.kept.get(g.key, ()))
            compared += len(g.candidates) > 1
            best = second = -math.inf
            n_scored = 0
            for c in g.candidates:
                name = c.source or "(none)"
                code = codes.get(name)
                if code is None:
                    code = codes[name] = len(counts)
                    counts.append(0)
                counts[code] += len(g.candidates) > 1
                s = scores.get((g.key, c.index))
                if s is None:
                    continue
                mean = s.mean
                source.append(code)
                score.append(mean)
                tokens.append(s.n_tokens)
                won.append(c.index in kept_set)
                n_scored += 1
                if mean > best:
                    best, second = mean, best
                elif mean > second:
                    second = mean
            if n_scored > 1:
                gaps.append(best - second)
        wins = Counter(c.source or "(none)" for g, c in selection.picks() if len(g.candidates) > 1)
        return cls(
            compared, wins, len(selection.groups) - compared, Counter(dict(zip(codes, counts))), tuple(codes),
            np.frombuffer(source, dtype=np.intc), np.frombuffer(score), np.frombuffer(tokens, dtype=np.int64),
            np.frombuffer(won, dtype=np.int8).astype(bool), np.frombuffer(gaps),
            np.fromiter((s.mean for s in scores.values()), float, len(scores)),
        )


def json_number(value: Any) -> str:
    """``json.dumps(value)`` for a number or None, without the encoder's per-call cost for an int or finite float."""
    kind = type(value)
    return repr(value) if kind is int or (kind is float and math.isfinite(value)) else json.dumps(value)


def score_line(row: dict[str, Any]) -> str:
    """A ``pipeline.score_rows`` row as the scores.jsonl line ``json.dumps(row, ensure_ascii=False)`` writes,
    in a fraction of its time."""
    source = "null" if row["source"] is None else encode_basestring(row["source"])
    return (f'{{"group": {encode_basestring(row["group"])}, "index": {row["index"]}, "part": {row["part"]}, '
            f'"row": {row["row"]}, "source": {source}, "score": {json_number(row["score"])}, '
            f'"fit": {json_number(row["fit"])}, "logprob_sum": {json_number(row["logprob_sum"])}, '
            f'"n_tokens": {json_number(row["n_tokens"])}, "selected": {"true" if row["selected"] else "false"}}}\n')


def median(values: Any) -> Optional[float]:
    """The median of a numpy array (of the two middle values, their mean, as ``statistics.median``), or None."""
    import numpy as np

    return float(np.median(values)) if len(values) else None


def summary(selection: Selection, tally: Optional[Tally] = None) -> dict[str, Any]:
    """Counts, drops by reason, wins per source and the spread of scores (``tally``: the selection's, if known)."""
    t = tally or Tally.of(selection)
    return {
        **selection.stats.as_dict(),
        "instructions_kept": len(selection.kept),
        "candidates_kept": sum(len(v) for v in selection.kept.values()),
        "instructions_compared": t.compared,
        "instructions_single_candidate": t.single,
        "metric": selection.metric,
        "made_by": dict(selection.made_by),
        "note": None if t.compared else NOTHING_COMPARED,
        "dropped": selection.drops.as_dict(),
        "skipped_rows": list(selection.skipped),
        "read": list(selection.reading),
        "wins_per_source": dict(t.wins.most_common()),
        "score": {
            "min": float(t.means.min()) if len(t.means) else None,
            "median": median(t.means),
            "max": float(t.means.max()) if len(t.means) else None,
            "median_gap_best_to_second": median(t.gaps),
        },
    }


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def preview_text(selection: Selection, width: int = 100) -> str:
    """Every instruction with its candidates (source, score, tokens, winner marked), then the summary."""
    lines = ["  (* kept)  source                           score tokens  response"]
    for g in selection.load(selection.groups):
        kept = selection.kept.get(g.key, [])
        lines.append(f"\n[{g.key}] {clip(g.prompt[-1]['content'], width - len(g.key) - 3)}")
        for c in g.candidates:
            s = selection.results.score((g.key, c.index))
            mark = "*" if c.index in kept else " "
            score = f"{s.mean:8.4f} {s.n_tokens:6d}" if s else "       -      -"
            lines.append(f"  {mark} {clip(c.source or '-', 30):30s} {score}  {clip(c.response, width - 50)}")
    return "\n".join(lines) + "\n\n" + summary_text(selection)


def summary_text(selection: Selection) -> str:
    """The summary in a few lines: counts, time, wins per source, score spread, drops by reason."""
    info = summary(selection)
    lines = [made_by_line(info["made_by"])] if info["made_by"] else []
    lines += [
        *(f"read {line}" for line in info["read"]),
        f"instructions: {info['instructions']} read, {info['instructions_kept']} kept; "
        f"candidates: {info['candidates']} read, {info['candidates_kept']} kept"
        + (f" ({info['truncated']} truncated at max_length)" if info["truncated"] else ""),
        f"scored: {info['scored']} new, {info['cached']} from cache, {info['tokens_scored']} tokens in {info['seconds']} s",
        "wins per source: " + (", ".join(f"{k} {v}" for k, v in info["wins_per_source"].items()) or "-")
        if info["instructions_compared"] else f"note: {NOTHING_COMPARED}",
    ]
    if info["instructions_compared"] and info["instructions_single_candidate"]:
        lines.append(f"single-candidate instructions: {info['instructions_single_candidate']} (kept, nothing to "
                     "compare: not counted as wins)")  # fmt: skip
    sc = info["score"]
    if sc["median"] is not None:
        gap = sc["median_gap_best_to_second"]
        lines.append(
            f"mean log-prob: min {sc['min']:.4f}, median {sc['median']:.4f}, max {sc['max']:.4f}"
            + (f"; median gap best-second {gap:.4f}" if gap is not None else "")
        )
    for kind, counts in info["dropped"].items():
        if counts or kind != "rows":
            lines.append(f"dropped {kind}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    lines += [f"  skipped: {message}" for message in info["skipped_rows"]]
    return "\n".join(lines)


def made_by_line(made: dict[str, Any]) -> str:
    """``model NAME (dtype on device); template T; metric M; grape-plugin V`` from ``Selection.made_by``."""
    model = made.get("model", {})
    run = ", ".join(f"{model[k]}" for k in ("dtype", "device") if model.get(k))
    name = model.get("name") or model.get("identity", "?")
    return (f"model: {name}{f' ({run})' if run else ''}; template {made.get('template')}; metric {made.get('metric')}; "
            f"grape-plugin {made.get('grape_plugin')}")


def compare_metrics(selection: Selection, variants: Mapping[str, Components], skipped: Mapping[str, str]) -> dict[str, Any]:
    """Select from the same scores under each metric (``variants``: each metric's components, the other options
    alike). Over the instructions that had a choice: how often each pair of metrics keeps the same candidates, the
    wins per source under each, and the mean length in tokens of what each keeps. A metric the scores cannot serve
    is listed under ``skipped`` (with those ``skipped`` already)."""
    from .selection import needs_scores

    kept, skipped = {}, dict(skipped)
    for name, parts in variants.items():
        try:
            kept[name] = parts.select(selection.groups, selection.scores)[0]
        except GrapeError as exc:
            skipped[name] = str(exc)
    cfg = next(iter(variants.values())).cfg if variants else None
    groups = [g for g in selection.groups if cfg is not None and needs_scores(g, cfg)]
    chosen = {m: {g.key: set(k.get(g.key, ())) for g in groups} for m, k in kept.items()}
    picks = {m: [(g, c) for g in groups for c in g.candidates if c.index in chosen[m][g.key]] for m in kept}

    def agreement(a: str, b: str) -> float:
        return round(statistics.fmean(chosen[a][g.key] == chosen[b][g.key] for g in groups), 4)

    def mean_tokens(m: str) -> Optional[float]:
        lengths = [selection.scores[(g.key, c.index)].n_tokens for g, c in picks[m]]
        return round(statistics.fmean(lengths), 1) if lengths else None

    return {
        "instructions": len(groups),
        "agreement": {a: {b: agreement(a, b) for b in kept} for a in kept} if groups else {},
        "wins_per_source": {m: dict(Counter(c.source or "(none)" for _, c in p).most_common()) for m, p in picks.items()},
        "mean_tokens": {m: mean_tokens(m) for m in kept},
        "skipped": skipped,
    }


def compare_text(info: dict[str, Any]) -> str:
    """``compare_metrics`` as tables: agreement, mean tokens kept, wins per source."""
    names = list(info["mean_tokens"])
    width = max([12, *map(len, names)]) + 1
    row = lambda label, cells: f"{clip(label, 32):32s}" + "".join(f"{c:>{width}}" for c in cells)  # noqa: E731
    lines = [f"{info['instructions']} instructions with a choice; "
             "share of them where two metrics keep the same candidates:", row("", names)]  # fmt: skip
    lines += [row(a, [f"{info['agreement'][a][b]:.2f}" for b in names]) for a in names]
    lines += ["", row("mean tokens kept", [f"{info['mean_tokens'][m] or 0:.1f}" for m in names]), "", "wins per source:"]
    wins = sum((Counter(info["wins_per_source"][m]) for m in names), Counter())
    lines += [row(s, [str(info["wins_per_source"][m].get(s, 0)) for m in names]) for s, _ in wins.most_common()]
    lines += [f"skipped {m}: {why}" for m, why in info["skipped"].items()]
    return "\n".join(lines)
