"""The selection report as one self-contained HTML page, for people to look at and share.

Charts are drawn with matplotlib and embedded as SVG data URIs; the counts come from ``report.summary``; the
table lists every candidate of the first ``TABLE_INSTRUCTIONS`` instructions with a search box. All dataset
text is HTML-escaped, and a Content-Security-Policy lets only the page's own script and style run and loads
nothing from the network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import Selection
from .report import best_gaps, summary

TABLE_INSTRUCTIONS = 300  # instructions listed in the table; scores.jsonl has them all
RESPONSE_CHARS = 2000  # response text embedded per candidate
TOP_SOURCES = 20  # sources drawn in the per-source charts
RASTER_POINTS = 2000  # above this many points, markers are embedded as a bitmap to keep the SVG small
DENSITY_POINTS = 4000  # a violin's density is estimated from at most this many evenly spaced quantiles
WIN, OTHER = "#2f6db5", "#9aa3ad"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1.5em;color:#1d2430}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .6em}.sub{color:#5b6573}
.cards{display:flex;flex-wrap:wrap;gap:.7em}.card{border:1px solid #d8dde3;border-radius:6px;padding:.5em .9em}
.card b{display:block;font-size:1.35em}.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1em}
.chart{width:100%;height:auto;border:1px solid #e3e7eb;border-radius:6px}
table{border-collapse:collapse;width:100%}table.drops{width:auto}th,td{padding:.3em .5em;text-align:left;vertical-align:top}
thead th{position:sticky;top:0;background:#f3f5f7;border-bottom:1px solid #c9d0d8}
tr.instr td{background:#eef2f7;border-top:2px solid #c9d0d8;font-weight:600}tr.instr .key{color:#5b6573;font-weight:400}
tr.win td{background:#e6f0fb}tr.win td.mark{color:#2f6db5;font-weight:700}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.resp{white-space:pre-wrap;max-width:0;width:60%}td.resp.long{cursor:pointer}
td.resp.long>div{max-height:6em;overflow:hidden}td.resp.long.open>div{max-height:none}
td.resp.long:not(.open)>div{mask-image:linear-gradient(#000 60%,transparent)}
#q{font:inherit;padding:.35em .6em;width:24em;max-width:100%}.note{color:#5b6573}
"""

SCRIPT = """
const q = document.getElementById("q"), shown = document.getElementById("shown");
const groups = [...document.querySelectorAll("tbody.group")], texts = groups.map(g => g.textContent.toLowerCase());
function filter() {
  const t = q.value.trim().toLowerCase();
  let n = 0;
  groups.forEach((g, i) => { g.hidden = t !== "" && !texts[i].includes(t); n += !g.hidden; });
  shown.textContent = n + " of " + groups.length + " instructions shown";
}
q.addEventListener("input", filter);
document.getElementById("table").addEventListener("click", e => {
  const cell = e.target.closest("td.resp.long");
  if (cell) cell.classList.toggle("open");
});
filter();
"""


@dataclass
class Point:
    """One scored candidate, for the charts."""

    source: str
    score: float
    tokens: int
    won: bool


def points(selection: Selection) -> list[Point]:
    """Every scored candidate with its source, score, response length in tokens and whether it was kept."""
    out = []
    for g in selection.groups:
        kept = set(selection.kept.get(g.key, []))
        for c in g.candidates:
            s = selection.scores.get((g.key, c.index))
            if s is not None:
                out.append(Point(c.source or "(none)", s.mean, s.n_tokens, c.index in kept))
    return out


def new_chart(title: str, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with one titled axes in the style every chart shares (no pyplot: no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def svg_image(fig: Any) -> str:
    """A figure as an ``<img>`` holding its SVG (a data URI keeps each figure's ids to itself); its title is the alt."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    alt = html.escape(fig.axes[0].get_title(loc="left"))
    return f'<img class="chart" alt="{alt}" src="data:image/svg+xml;base64,{data}">'


def quantiles(values: list[float]) -> list[float]:
    """At most ``DENSITY_POINTS`` values, evenly spaced through the sorted ``values`` (a density's cost is linear)."""
    step = -(-len(values) // DENSITY_POINTS)
    return values if step == 1 else sorted(values)[::step]


def source_charts(selection: Selection, pts: list[Point], wins: dict[str, int]) -> list[str]:
    """Candidates kept per source (bars, with candidates offered) and each source's score distribution (violins)."""
    offered = Counter(c.source or "(none)" for g in selection.groups for c in g.candidates)
    sources = sorted(offered, key=lambda s: (-wins.get(s, 0), -offered[s], s))[:TOP_SOURCES]
    more = f" (top {TOP_SOURCES} of {len(offered)})" if len(offered) > TOP_SOURCES else ""
    height = max(4.0, 1.2 + 0.32 * len(sources))
    ys = range(len(sources))[::-1]  # first source on top

    fig, ax = new_chart("Wins per source" + more, height)
    counts = [wins.get(s, 0) for s in sources]
    ax.barh(ys, counts, color=WIN)
    for y, s, n in zip(ys, sources, counts):
        ax.annotate(f" {n} of {offered[s]}", (n, y), va="center", fontsize=8, color="#333")
    ax.set_yticks(list(ys), sources, fontsize=8)
    ax.set_xlim(0, max(counts, default=0) * 1.25 + 1)
    ax.set_xlabel("candidates kept (label: kept of offered)")
    charts = [svg_image(fig)]

    raster = len(pts) > RASTER_POINTS
    by_source = defaultdict(list)
    for p in pts:
        by_source[p.source].append(p.score)
    fig, ax = new_chart("Score distribution per source" + more, height)
    spread = [(y, by_source[s]) for y, s in zip(ys, sources) if len(set(by_source[s])) > 1]
    if spread:  # a density needs two distinct values
        parts = ax.violinplot([quantiles(v) for _, v in spread], positions=[y for y, _ in spread], orientation="horizontal",
                              widths=0.8, showmedians=True)
        for body in parts["bodies"]:
            body.set(facecolor=WIN, alpha=0.35)
    for y, s in zip(ys, sources):
        ax.plot(by_source[s], [y] * len(by_source[s]), "|", color="#333", alpha=0.5, markersize=6, rasterized=raster)
    ax.set_yticks(list(ys), sources, fontsize=8)
    ax.set_xlabel("score (mean log-prob per response token)")
    return charts + [svg_image(fig)]


def length_chart(pts: list[Point]) -> str:
    """Score against response length, kept candidates highlighted, with the correlation in the title."""
    tokens, scores = [p.tokens for p in pts], [p.score for p in pts]
    title = "Score vs response length"
    if len(set(tokens)) > 1 and len(set(scores)) > 1:
        title += f" (Pearson r = {statistics.correlation(tokens, scores):.2f})"
    fig, ax = new_chart(title)
    raster = len(pts) > RASTER_POINTS
    for won, color, label in ((False, OTHER, "not kept"), (True, WIN, "kept")):
        sel = [p for p in pts if p.won == won]
        ax.scatter([p.tokens for p in sel], [p.score for p in sel], s=12 if won else 8, color=color,
                   alpha=0.8 if won else 0.5, label=f"{label} ({len(sel)})", rasterized=raster, linewidths=0)
    ax.set_xlabel("response tokens")
    ax.set_ylabel("score")
    ax.legend(frameon=False, fontsize=8, loc="lower right" if raster else "best")  # "best" scans every point
    return svg_image(fig)


def gap_chart(gaps: list[float]) -> str:
    """How far each instruction's best candidate is ahead of its second."""
    fig, ax = new_chart(f"Best minus second-best score ({len(gaps)} instructions)")
    ax.hist(gaps, bins=min(40, max(5, len(gaps) // 4)), color=WIN, alpha=0.8)
    ax.set_xlabel("score gap")
    ax.set_ylabel("instructions")
    return svg_image(fig)


def charts_html(selection: Selection, info: dict[str, Any]) -> str:
    import matplotlib

    pts = points(selection)
    if not pts:
        return '<p class="note">No candidate was scored (every instruction kept all its candidates).</p>'
    gaps = best_gaps(selection)
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}):  # "$" in a source name is text
        charts = source_charts(selection, pts, info["wins_per_source"]) + [length_chart(pts)]
        if gaps:
            charts.append(gap_chart(gaps))
    return '<div class="charts">' + "".join(charts) + "</div>"


def counts_html(info: dict[str, Any]) -> str:
    """Cards for the counts and a line per drop reason."""
    e = html.escape
    cards = [
        ("instructions", f"{info['instructions_kept']} of {info['instructions']}", "kept"),
        ("candidates", f"{info['candidates_kept']} of {info['candidates']}", "kept"),
        ("scored", f"{info['scored']}", f"+ {info['cached']} from cache"),
        ("tokens scored", f"{info['tokens_scored']:,}", "prompt + response"),
        ("time", f"{info['seconds']} s", "read to selection"),
    ]
    sc = info["score"]
    if sc["median"] is not None:
        cards.append(("median score", f"{sc['median']:.3f}", f"range {sc['min']:.3f} to {sc['max']:.3f}"))
    if sc["median_gap_best_to_second"] is not None:
        cards.append(("median gap", f"{sc['median_gap_best_to_second']:.3f}", "best minus second"))
    out = '<div class="cards">' + "".join(
        f'<div class="card">{e(name)}<b>{e(value)}</b><span class="note">{e(note)}</span></div>'
        for name, value, note in cards
    ) + "</div>"
    rows = "".join(
        f"<tr><td>{e(kind)}</td><td>{e(reason.replace('_', ' '))}</td><td class=\"num\">{n}</td></tr>"
        for kind, counts in info["dropped"].items() for reason, n in counts.items()
    )
    if info["truncated"]:
        rows += f'<tr><td>candidates</td><td>kept, truncated at max_length</td><td class="num">{info["truncated"]}</td></tr>'

    return out + (
        f'<h2>Dropped</h2><table class="drops"><thead><tr><th>what</th><th>reason</th><th>count</th></tr></thead>{rows}</table>'
        if rows else "<h2>Dropped</h2><p>Nothing was dropped.</p>"
    )


def clip(text: str) -> str:
    return text if len(text) <= RESPONSE_CHARS else text[:RESPONSE_CHARS] + f"… ({len(text) - RESPONSE_CHARS:,} more characters)"


def table_html(selection: Selection) -> str:
    """Instructions with every candidate, best score first, kept ones marked; a search box filters them."""
    e = html.escape
    bodies = []
    for g in selection.load(selection.groups[:TABLE_INSTRUCTIONS]):
        kept = selection.kept.get(g.key)
        earlier = f" (+{len(g.prompt) - 1} earlier messages)" if len(g.prompt) > 1 else ""
        status = "" if kept is not None else " — not kept (over budget)"
        rows = [f'<tr class="instr"><td colspan="5"><span class="key">{e(g.key)}</span> '
                f"{e(g.prompt[-1]['content'])}{e(earlier + status)}</td></tr>"]
        ranked = sorted(g.candidates, key=lambda c: -selection.scores[(g.key, c.index)].mean
                        if (g.key, c.index) in selection.scores else float("inf"))
        for c in ranked:
            s = selection.scores.get((g.key, c.index))
            won = kept is not None and c.index in kept
            long = " long" if len(c.response) > 300 or c.response.count("\n") > 4 else ""
            rows.append(
                f'<tr class="cand{" win" if won else ""}"><td class="mark">{"★ kept" if won else ""}</td>'
                f"<td>{e(c.source or '-')}</td><td class=\"num\">{'-' if s is None else f'{s.mean:.4f}'}</td>"
                f"<td class=\"num\">{'-' if s is None else s.n_tokens}</td>"
                f'<td class="resp{long}"><div>{e(clip(c.response))}</div></td></tr>'
            )
        bodies.append(f'<tbody class="group">{"".join(rows)}</tbody>')
    note = ""
    if len(selection.groups) > TABLE_INSTRUCTIONS:
        note = f'<p class="note">The first {TABLE_INSTRUCTIONS} of {len(selection.groups)} instructions; scores.jsonl has them all.</p>'
    return (
        '<p><input id="q" type="search" placeholder="Search instructions, responses, sources" aria-label="search"> '
        f'<span id="shown" class="note"></span></p>{note}<table id="table"><thead><tr><th></th><th>source</th>'
        '<th>score</th><th>tokens</th><th>response (click a long one to expand)</th></tr></thead>'
        + "".join(bodies) + "</table>"
    )


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_html(selection: Selection) -> str:
    """The whole page as a string."""
    info = summary(selection)
    title = "GRAPE selection report"
    csp = f"default-src 'none'; img-src data:; style-src {csp_hash(STYLE)}; script-src {csp_hash(SCRIPT)}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"sub\">Per instruction GRAPE keeps the response the base model "
        "finds most likely: the highest mean log-probability of its tokens.</p>"
        f"<h2>Counts</h2>{counts_html(info)}<h2>Charts</h2>{charts_html(selection, info)}"
        f"<h2>Instructions and candidates</h2>{table_html(selection)}<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(selection: Selection, path: str | Path) -> Path:
    """Write the report page to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(selection), encoding="utf-8")
    return path
