"""The selection report as one self-contained HTML page, for people to look at and share.

Charts are drawn straight into SVG (embedded as data URIs) from aggregated numbers: counts, histograms,
quantiles and evenly thinned points, so their size and cost do not grow with the candidates; the counts come
from ``report.summary``; the
table lists the first ``TABLE_INSTRUCTIONS`` instructions, each with its best ``TABLE_CANDIDATES`` candidates
(and any kept one), with a search box: the page stays bounded however many candidates there are. All dataset
text is HTML-escaped, and a Content-Security-Policy lets only the page's own script and style run and loads
nothing from the network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

from .records import Selection
from .report import Tally, summary

TABLE_INSTRUCTIONS = 300  # instructions listed in the table; scores.jsonl has them all
TABLE_CANDIDATES = 20  # best-scored candidates listed per instruction (and any kept one below them)
RESPONSE_CHARS = 2000  # instruction and response text embedded per row
TOP_SOURCES = 20  # sources drawn in the per-source charts
DENSITY_BINS = 120  # a violin's density is smoothed from a histogram of this many bins
RUG_POINTS = 500  # a source's scores are marked by at most this many evenly spaced quantiles
SCATTER_POINTS = 2000  # kept and not-kept candidates drawn, at most, each, in the length chart
WIDTH = 600  # chart width in pixels
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


def thin(values: Any, most: int) -> Any:
    """At most ``most`` of ``values``, evenly spaced."""
    return values[:: max(1, -(-len(values) // most))]


def quantiles(values: Any, most: int) -> Any:
    """At most ``most`` values, evenly spaced through the sorted ``values`` (a numpy array)."""
    import numpy as np

    return thin(np.sort(values), most)


def ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) from ``lo`` to ``hi``, at most ``most`` of them."""
    step = 10.0 ** math.floor(math.log10((hi - lo) / most))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= most)
    return [round(k * step, 12) for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def span(values: Any, pad: float = 0.04) -> tuple[float, float]:
    """The range of ``values`` with a margin; values all (nearly) equal get a unit-wide range around them."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi), 1.0):
        return lo - 0.5, hi + 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def number(v: float) -> str:
    return f"{v:.6g}"


class Chart:
    """A chart drawn straight into SVG: a title, a plot area with axes, and shapes placed in data coordinates."""

    def __init__(self, title: str, x: tuple[float, float], y: tuple[float, float], height: int = 300,
                 left: int = 56) -> None:  # fmt: skip
        self.title, self.height, self.x, self.y = title, height, x, y
        self.box = (left, 30, WIDTH - 16, height - 40)  # plot area: left, top, right, bottom
        self.parts: list[str] = []

    def px(self, v: Any) -> Any:
        left, _, right, _ = self.box
        return left + (v - self.x[0]) / (self.x[1] - self.x[0]) * (right - left)

    def py(self, v: Any) -> Any:
        _, top, _, bottom = self.box
        return bottom - (v - self.y[0]) / (self.y[1] - self.y[0]) * (bottom - top)

    def text(self, x: float, y: float, text: str, anchor: str = "start", size: int = 11, extra: str = "") -> None:
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
                          f"{html.escape(text)}</text>")  # fmt: skip

    def axes(self, xlabel: str, ylabel: str = "", yticks: bool = True) -> None:
        """Both axis lines, round ticks on x (and on y when ``yticks``) and the axis labels."""
        left, top, right, bottom = self.box
        self.parts.append(f'<path d="M{left} {top}V{bottom}H{right}" fill="none" stroke="#333"/>')
        for v in ticks(*self.x):
            self.parts.append(f'<path d="M{self.px(v):.1f} {bottom}v4" stroke="#333"/>')
            self.text(self.px(v), bottom + 15, number(v), "middle")
        self.text((left + right) / 2, self.height - 6, xlabel, "middle")
        if yticks:
            for v in ticks(*self.y):
                self.parts.append(f'<path d="M{left} {self.py(v):.1f}h-4" stroke="#333"/>')
                self.text(left - 6, self.py(v) + 4, number(v), "end")
        if ylabel:
            self.text(14, (top + bottom) / 2, ylabel, "middle", extra=f' transform="rotate(-90 14 {(top + bottom) / 2:.1f})"')

    def categories(self, names: list[str]) -> None:
        """Names down the y axis, the first on top (at y = len - 1)."""
        for y, name in zip(range(len(names))[::-1], names):
            self.text(self.box[0] - 6, self.py(y) + 4, clip_label(name), "end", 10)

    def dots(self, xs: Any, ys: Any, color: str, size: float, alpha: float) -> None:
        """One round dot per point, as a single path."""
        d = "".join(f"M{a:.1f} {b:.1f}h0" for a, b in zip(self.px(xs).tolist(), self.py(ys).tolist()))
        self.parts.append(f'<path d="{d}" stroke="{color}" stroke-width="{size}" stroke-linecap="round" '
                          f'stroke-opacity="{alpha}"/>')  # fmt: skip

    def image(self) -> str:
        """The chart as an ``<img>`` holding its SVG as a data URI; its title is the alt text."""
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{self.height}" '
               f'viewBox="0 0 {WIDTH} {self.height}" font-family="DejaVu Sans,Arial,sans-serif" fill="#1d2430">'
               f'<rect width="100%" height="100%" fill="#fff"/>')  # fmt: skip
        svg += f'<text x="{self.box[0]}" y="18" font-size="13">{html.escape(self.title)}</text>' + "".join(self.parts)
        data = base64.b64encode((svg + "</svg>").encode("utf-8")).decode("ascii")
        return f'<img class="chart" alt="{html.escape(self.title)}" src="data:image/svg+xml;base64,{data}">'


def clip_label(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def density(values: Any) -> tuple[Any, Any]:
    """A Gaussian kernel density (Scott's bandwidth) of ``values`` at ``DENSITY_BINS`` points over their range
    (``span`` without a margin), computed from a histogram: linear in the values, whatever their number."""
    import numpy as np

    counts, edges = np.histogram(values, DENSITY_BINS, span(values, 0))
    width = edges[1] - edges[0]
    sigma = max(float(np.std(values, ddof=1)) * len(values) ** -0.2 / width, 0.5)  # in bins
    kernel = np.exp(-0.5 * (np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1) / sigma) ** 2)
    smooth = np.convolve(counts, kernel, mode="full")[len(kernel) // 2 : len(kernel) // 2 + len(counts)]
    return (edges[:-1] + edges[1:]) / 2, smooth / smooth.max()


def source_charts(t: Tally) -> list[str]:
    """Candidates kept per source (bars, with candidates offered) and each source's score distribution (violins
    with a median mark, and a rug of at most ``RUG_POINTS`` evenly spaced quantiles)."""
    import numpy as np

    offered, wins = t.offered, t.wins
    sources = sorted(t.sources, key=lambda s: (-wins.get(s, 0), -offered[s], s))[:TOP_SOURCES]
    more = f" (top {TOP_SOURCES} of {len(t.sources)})" if len(t.sources) > TOP_SOURCES else ""
    height = int(max(300, 90 + 24 * len(sources)))
    left = 16 + 6 * max(len(clip_label(s)) for s in sources)
    ys = range(len(sources))[::-1]  # first source on top
    rows = (-0.6, len(sources) - 0.4)

    counts = [wins.get(s, 0) for s in sources]
    bars = Chart("Wins per source" + more, (0, max(counts, default=0) * 1.25 + 1), rows, height, left)
    band = (bars.py(0) - bars.py(1)) * 0.8
    for y, s, n in zip(ys, sources, counts):
        bars.parts.append(f'<rect x="{bars.px(0):.1f}" y="{bars.py(y) - band / 2:.1f}" width="{bars.px(n) - bars.px(0):.1f}" '
                          f'height="{band:.1f}" fill="{WIN}"/>')  # fmt: skip
        bars.text(bars.px(n) + 3, bars.py(y) + 4, f"{n} of {offered[s]}", size=10)
    bars.axes("candidates kept (label: kept of offered, in instructions with a choice)", yticks=False)
    bars.categories(sources)

    code = {name: i for i, name in enumerate(t.sources)}
    by_source = {s: t.score[t.source == code[s]] for s in sources}
    violins = Chart("Score distribution per source" + more, span(t.score), rows, height, left)
    for y, s in zip(ys, sources):
        v = by_source[s]
        if len(v) and v.min() < v.max():  # a density needs two distinct values
            at, dens = density(v)
            half = dens * band / 2
            xs, top, low = violins.px(at), violins.py(y) - half, violins.py(y) + half
            outline = [*zip(xs, top), *zip(xs[::-1], low[::-1])]
            violins.parts.append('<path d="M' + "L".join(f"{a:.1f} {b:.1f}" for a, b in outline) +
                                 f'Z" fill="{WIN}" fill-opacity="0.35" stroke="{WIN}"/>')  # fmt: skip
            mid = violins.px(float(np.median(v)))
            violins.parts.append(f'<path d="M{mid:.1f} {violins.py(y) - band / 2:.1f}v{band:.1f}" stroke="{WIN}"/>')
        rug = violins.px(quantiles(v, RUG_POINTS)).tolist()
        violins.parts.append('<path d="' + "".join(f"M{a:.1f} {violins.py(y) - 5:.1f}v10" for a in rug) +
                             '" stroke="#333" stroke-opacity="0.5"/>')  # fmt: skip
    violins.axes("score (mean log-prob per response token)", yticks=False)
    violins.categories(sources)
    return [bars.image(), violins.image()]


def length_chart(t: Tally) -> str:
    """Score against response length, kept candidates highlighted, with the correlation in the title; each of the
    two sets is thinned to ``SCATTER_POINTS`` evenly spaced candidates (the legend says so)."""
    import numpy as np

    title = "Score vs response length"
    if t.tokens.min() < t.tokens.max() and t.score.min() < t.score.max():
        title += f" (Pearson r = {np.corrcoef(t.tokens, t.score)[0, 1]:.2f})"
    chart = Chart(title, span(t.tokens), span(t.score))
    legend = []
    for won, color, label in ((False, OTHER, "not kept"), (True, WIN, "kept")):
        at = np.flatnonzero(t.won == won)
        drawn = thin(at, SCATTER_POINTS)
        chart.dots(t.tokens[drawn], t.score[drawn], color, 4 if won else 3, 0.8 if won else 0.5)
        legend.append((color, f"{label} ({len(at)}" + (f", {len(drawn)} drawn)" if len(drawn) < len(at) else ")")))
    right, bottom = chart.box[2], chart.box[3]
    for n, (color, label) in enumerate(legend):
        y = bottom - 26 + 14 * n
        chart.parts.append(f'<circle cx="{right - 8}" cy="{y - 4}" r="3" fill="{color}"/>')
        chart.text(right - 16, y, label, "end", 10)
    chart.axes("response tokens", "score")
    return chart.image()


def gap_chart(gaps: Any) -> str:
    """How far each instruction's best candidate is ahead of its second."""
    import numpy as np

    counts, edges = np.histogram(gaps, min(40, max(5, len(gaps) // 4)), span(gaps, 0))
    chart = Chart(f"Best minus second-best score ({len(gaps)} instructions)", span(edges, 0.02),
                  (0, float(counts.max()) * 1.05))  # fmt: skip
    for n, a, b in zip(counts.tolist(), chart.px(edges[:-1]).tolist(), chart.px(edges[1:]).tolist()):
        chart.parts.append(f'<rect x="{a:.1f}" y="{chart.py(n):.1f}" width="{max(b - a - 0.5, 0.5):.1f}" '
                           f'height="{chart.py(0) - chart.py(n):.1f}" fill="{WIN}" fill-opacity="0.8"/>')  # fmt: skip
    chart.axes("score gap", "instructions")
    return chart.image()


def charts_html(t: Tally) -> str:
    if not len(t.score):
        return '<p class="note">No candidate was scored (every instruction kept all its candidates).</p>'
    charts = source_charts(t) + [length_chart(t)]
    if len(t.gaps):
        charts.append(gap_chart(t.gaps))
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


def made_by_html(made: dict[str, Any]) -> str:
    """The model, template, metric and grape-plugin's version that made the selection, then every option."""
    e = html.escape
    model = made.get("model", {})
    rows = [(k, model[k]) for k in ("name", "revision", "identity", "dtype", "device") if model.get(k) is not None]
    rows += [(k, made[k]) for k in ("template", "metric", "strategy", "grape_plugin") if made.get(k) is not None]
    options = json.dumps(made.get("options", {}), indent=1, ensure_ascii=False)
    return ('<table class="drops">' + "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in rows)
            + f"</table><details><summary>options</summary><pre>{e(options)}</pre></details>")


def clip(text: str) -> str:
    return text if len(text) <= RESPONSE_CHARS else text[:RESPONSE_CHARS] + f"… ({len(text) - RESPONSE_CHARS:,} more characters)"


def table_html(selection: Selection) -> str:
    """Instructions with their best candidates by the run's metric, best first, kept ones marked; a search box
    filters them."""
    e = html.escape
    bodies, fit = [], selection.results.fit_of
    for g in selection.load(selection.groups[:TABLE_INSTRUCTIONS]):
        kept = selection.kept.get(g.key)
        earlier = f" (+{len(g.prompt) - 1} earlier messages)" if len(g.prompt) > 1 else ""
        status = "" if kept is not None else " — not kept (over budget)"
        rows = [f'<tr class="instr"><td colspan="5"><span class="key">{e(g.key)}</span> '
                f"{e(clip(g.prompt[-1]['content']))}{e(earlier + status)}</td></tr>"]
        ranked = sorted(g.candidates, key=lambda c: -f if (f := fit((g.key, c.index))) is not None else float("inf"))
        shown = [c for n, c in enumerate(ranked) if n < TABLE_CANDIDATES or (kept is not None and c.index in kept)]
        for c in shown:
            s, value = selection.results.score((g.key, c.index)), fit((g.key, c.index))
            won = kept is not None and c.index in kept
            long = " long" if len(c.response) > 300 or c.response.count("\n") > 4 else ""
            rows.append(
                f'<tr class="cand{" win" if won else ""}"><td class="mark">{"★ kept" if won else ""}</td>'
                f"<td>{e(c.source or '-')}</td><td class=\"num\">{'-' if value is None else f'{value:.4f}'}</td>"
                f"<td class=\"num\">{'-' if s is None else s.n_tokens}</td>"
                f'<td class="resp{long}"><div>{e(clip(c.response))}</div></td></tr>'
            )
        if len(shown) < len(ranked):
            rows.append(f'<tr class="more"><td colspan="5" class="note">{len(ranked) - len(shown)} more candidates '
                        "ranked below; scores.jsonl has them all</td></tr>")
        bodies.append(f'<tbody class="group">{"".join(rows)}</tbody>')
    note = ""
    if len(selection.groups) > TABLE_INSTRUCTIONS:
        note = f'<p class="note">The first {TABLE_INSTRUCTIONS} of {len(selection.groups)} instructions; scores.jsonl has them all.</p>'
    return (
        '<p><input id="q" type="search" placeholder="Search instructions, responses, sources" aria-label="search"> '
        f'<span id="shown" class="note"></span></p>{note}<table id="table"><thead><tr><th></th><th>source</th>'
        f'<th>{"score" if selection.metric == "mean" else e(selection.metric)}</th><th>tokens</th>'
        '<th>response (click a long one to expand)</th></tr></thead>'
        + "".join(bodies) + "</table>"
    )


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_html(selection: Selection, tally: Optional[Tally] = None) -> str:
    """The whole page as a string (``tally``: the selection's, if known)."""
    tally = tally or Tally.of(selection)
    info = summary(selection, tally)
    title = "GRAPE selection report"
    csp = f"default-src 'none'; img-src data:; style-src {csp_hash(STYLE)}; script-src {csp_hash(SCRIPT)}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"sub\">Per instruction GRAPE keeps the response the base model "
        "finds most likely: the highest mean log-probability of its tokens.</p>"
        f"<h2>Counts</h2>{counts_html(info)}<h2>Made by</h2>{made_by_html(info['made_by'])}"
        f"<h2>Charts</h2>{charts_html(tally)}"
        f"<h2>Instructions and candidates</h2>{table_html(selection)}<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(selection: Selection, path: str | Path, tally: Optional[Tally] = None) -> Path:
    """Write the report page to ``path`` (``tally``: the selection's, if known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(selection, tally), encoding="utf-8")
    return path
