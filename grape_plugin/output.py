"""What a run leaves on disk besides the selected data: ``scores.jsonl`` (one row per candidate), ``report.json``
(the summary, with what made the selection) and ``report.html`` (charts and a browsable table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .records import Selection


def score_rows(selection: Selection) -> Iterator[dict[str, Any]]:
    """One ``scores.jsonl`` row per candidate, in group order, made as they are written (no table is built)."""
    for g in selection.groups:
        kept = set(selection.kept.get(g.key, ()))
        for c in g.candidates:
            s = selection.results.score((g.key, c.index))
            yield {
                "group": g.key,
                "index": c.index,
                "part": c.part,
                "row": c.row,
                "source": c.source,
                "score": None if s is None else s.mean,
                "fit": selection.results.fit_of((g.key, c.index)),
                "logprob_sum": None if s is None else s.logprob_sum,
                "n_tokens": None if s is None else s.n_tokens,
                "selected": c.index in kept,
            }


def write_report(selection: Selection, out_dir: str | Path) -> dict[str, Path]:
    """``scores.jsonl`` (one row per candidate), ``report.json`` (the summary) and ``report.html`` (charts and a
    browsable table) in ``out_dir``; ``host.write_folder`` is its one caller. The candidates are gone through
    twice: once to stream scores.jsonl, once to tally what the summary and the page need (``report.Tally``)."""
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
