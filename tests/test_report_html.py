"""The HTML selection report: escaping and the table cap offline, then the real page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from tests.helpers import pool_rows

from grape_plugin import report_html
from grape_plugin.records import Candidate, Drops, Group, Results, Score, Selection, Stats
from grape_plugin.cli import main

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--window-size=1280,1024", "--remote-debugging-port=0",
]


class Chromium:
    """Headless Chromium driven over the DevTools protocol on 127.0.0.1, recording every event it sends."""

    def __init__(self, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # "port\npath": written once Chromium listens on its chosen port
        deadline = time.monotonic() + 60
        while len(lines := port_file.read_text().split() if port_file.exists() else []) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = lines[0]
        targets = json.loads(urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.last_id = 0
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: Any) -> dict:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.last_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]
            self.events.append(msg)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def console_errors(self) -> list[dict]:
        """Uncaught exceptions, console.error/assert calls and browser-logged errors (CSP, failed loads)."""
        return [
            e["params"] for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def chromium(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium command under CI: .ci/run installs it")
        pytest.skip("the browser test needs a chromium command (e.g. apt-get install chromium); none is installed")
    browser = Chromium(tmp_path / "profile")
    yield browser
    browser.close()


def hand_selection(n_groups: int) -> Selection:
    """Instructions and responses full of markup, two candidates each, the first kept."""
    groups, scores = [], {}
    for i in range(n_groups):
        cands = [Candidate(f'<img src=x onerror="alert({i})"> answer {j}', f"<b>src{j}</b>", 2 * i + j, j) for j in range(2)]
        groups.append(Group(f"g{i}", ({"role": "user", "content": f"<script>alert({i})</script> & co"},), tuple(cands)))
        scores.update({(f"g{i}", j): Score(-1.0 - j - i / 10, 10 + j) for j in range(2)})
    results = Results.of((k, s, s.mean) for k, s in scores.items())
    return Selection(tuple(groups), results, {g.key: (0,) for g in groups}, Drops(), Stats(n_groups, 2 * n_groups))


def test_user_text_is_escaped_and_the_table_capped(monkeypatch):
    monkeypatch.setattr(report_html, "TABLE_INSTRUCTIONS", 3)
    page = report_html.render_html(hand_selection(5))
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>src" not in page
    assert "&lt;script&gt;alert(0)&lt;/script&gt; &amp; co" in page and "&lt;b&gt;src1&lt;/b&gt;" in page
    assert page.count('<tbody class="group">') == 3 and "The first 3 of 5 instructions;" in page
    assert page.count('<img class="chart"') == 4 and "default-src 'none'" in page  # nothing loads from outside


def test_the_table_ranks_and_shows_the_runs_metric():
    from dataclasses import replace

    plain = hand_selection(1)
    sums = Results.of((key, score, {0: -11.0, 1: -5.0}[key[1]]) for key, score, _ in plain.results.rows())
    by_sum = replace(plain, metric="sum", kept={"g0": (1,)}, results=sums)
    table = report_html.table_html(by_sum)
    assert "<th>sum</th>" in table and table.index("-5.0000") < table.index("-11.0000")  # the kept one first
    assert "<th>score</th>" in report_html.table_html(hand_selection(1))


def test_preview_writes_html(tiny_model, pool_file, tmp_path, capsys):
    html = tmp_path / "sub" / "report.html"
    assert main(["preview", str(pool_file), "--model", str(tiny_model), "--limit", "2", "--no-cache", "--html", str(html)]) == 0
    assert f"html report: {html}" in capsys.readouterr().out
    assert html.read_text().count('<tbody class="group">') == 2


def test_report_renders_in_chromium(tiny_model, pool_file, tmp_path, chromium):
    out = tmp_path / "out"
    assert main(["select", str(pool_file), "--model", str(tiny_model), "-o", str(out), "--no-cache"]) == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    chromium.open((out / "report.html").as_uri())

    shot = chromium.screenshot(tmp_path / "report.png")
    from PIL import Image

    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.width == 1280 and len(image.getcolors(1 << 24)) > 100  # charts and text, not a blank page

    charts = chromium.evaluate("""[...document.querySelectorAll("img.chart")].map(i => ({
        loaded: i.complete && i.naturalWidth > 0, w: i.getBoundingClientRect().width, h: i.getBoundingClientRect().height}))""")
    assert len(charts) == 4 and all(c["loaded"] and c["w"] > 100 and c["h"] > 100 for c in charts), charts

    visible = """JSON.stringify([document.querySelectorAll("tbody.group:not([hidden])").length,
        [...document.querySelectorAll("tr.cand")].filter(r => r.offsetParent !== null).length,
        document.getElementById("shown").textContent])"""
    assert json.loads(chromium.evaluate(visible)) == [6, len(scores), "6 of 6 instructions shown"]
    assert chromium.evaluate('document.querySelectorAll("tr.win").length') == sum(s["selected"] for s in scores) == 6

    def search(text: str) -> list:
        chromium.evaluate(f'q.value = {json.dumps(text)}; q.dispatchEvent(new Event("input"))')
        return json.loads(chromium.evaluate(visible))

    third = next(r for r in pool_rows(6) if r["id"] == "ae-003")
    assert search(third["instruction"][:40].upper()) == [1, sum(s["group"] == "ae-003" for s in scores), "1 of 6 instructions shown"]
    assert search("no response says this 7f3a") == [0, 0, "0 of 6 instructions shown"]
    assert search("")[0] == 6
    assert chromium.console_errors() == []


def test_kept_of_offered_counts_the_instructions_with_a_choice():
    """A candidate kept without a comparison is no win, so it is not offered either: "kept of offered" shares one
    base."""
    from dataclasses import replace

    from grape_plugin.report import Tally

    two = hand_selection(2)
    lone = Group("lone", ({"role": "user", "content": "q"},), (Candidate("only", "<b>src0</b>", 9, 0),))
    scores = Results.of([*((k, s, f) for k, s, f in two.results.rows()), (("lone", 0), Score(-1.0, 3), -1 / 3)])
    tally = Tally.of(replace(two, groups=(*two.groups, lone), results=scores, kept={**two.kept, "lone": (0,)}))
    assert tally.wins == {"<b>src0</b>": 2} and tally.offered == {"<b>src0</b>": 2, "<b>src1</b>": 2}
    assert tally.single == 1 and len(tally.score) == 5  # its score is still in the distribution


def many_candidates(n_groups: int, per_group: int) -> Selection:
    """``n_groups`` instructions of ``per_group`` candidates from 30 sources, scores falling with the index; the
    last (worst) candidate of each is the one kept."""
    groups, scores = [], {}
    for i in range(n_groups):
        cands = tuple(Candidate(f"response {i}.{j} " + "words " * 40, f"source {j % 30}", i * per_group + j, j)
                      for j in range(per_group))  # fmt: skip
        groups.append(Group(f"g{i}", ({"role": "user", "content": f"instruction {i}"},), cands))
        scores.update({(f"g{i}", j): Score(-(1 + j / per_group + i % 97 / 100) * (10 + j % 300), 10 + j % 300)
                       for j in range(per_group)})  # fmt: skip
    kept = {g.key: (per_group - 1,) for g in groups}
    results = Results.of((k, s, s.mean) for k, s in scores.items())
    return Selection(tuple(groups), results, kept, Drops(), Stats(n_groups, n_groups * per_group))


def test_the_page_stays_bounded_however_many_candidates():
    cap = report_html.TABLE_INSTRUCTIONS
    page = report_html.render_html(many_candidates(10 * cap, 8))  # 24,000 candidates: every cap reached
    big = report_html.render_html(many_candidates(25 * cap, 8))  # 60,000: only the numbers in the page differ
    assert len(big) < len(page) * 1.02 and f"The first {cap} of {25 * cap} instructions;" in big
    assert big.count('<tbody class="group">') == cap and big.count('<img class="chart"') == 4
    charts = [base64.b64decode(c).decode() for c in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', big)]
    assert re.search(r"kept \(7500, \d+ drawn\)", charts[2])  # the scatter is thinned, and says so

    wide = report_html.render_html(many_candidates(3, 2000))  # few instructions of many candidates
    shown = report_html.TABLE_CANDIDATES + 1  # the best ones and the kept one
    assert wide.count('<tr class="cand') == 3 * shown and wide.count("★ kept") == 3
    assert wide.count(f"{2000 - shown} more candidates ranked below; scores.jsonl has them all") == 3
    assert len(wide) < len(page)
