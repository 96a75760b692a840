"""scores.jsonl lines are written without json.dumps per row, and must read exactly as json.dumps writes them."""

from __future__ import annotations

import json
import math

from grape_plugin.output import score_rows
from grape_plugin.records import Candidate, Group, Results, Score, Selection
from grape_plugin.report import score_line


def test_score_lines_are_what_json_dumps_writes():
    text = 'é "quoted" \\ back\nslash \u2028 \x01 \ud800 😀'
    cands = (Candidate("a", text, 0, 0), Candidate("b", None, 1, 1, part=2, item=0), Candidate("c", "s", 2, 2))
    group = Group(f"p:{text}", ({"role": "user", "content": "q"},), cands)
    scores = {(group.key, 0): Score(-3.25, 4), (group.key, 2): Score(-math.inf, 1)}
    fits = {(group.key, 0): 0.1 + 0.2, (group.key, 2): math.nan}
    selection = Selection((group,), Results.of((k, s, fits[k]) for k, s in scores.items()), {group.key: (0,)})
    for row in score_rows(selection):
        assert score_line(row) == json.dumps(row, ensure_ascii=False) + "\n"
