"""The A/B benchmark's smoke run: every arm selected, trained and evaluated on a tiny random model, and reported."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

from tests.helpers import ROOT

ARMS = ["best", "worst", "random", "best_min_k", "most_picked", "reference"]


def test_sft_ab_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft_ab.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    head, _, rest = done.stdout.strip().splitlines()[-1].partition(" ")
    fields = dict(part.split("=") for part in rest.split())
    assert head == "sft_ab" and fields["arms"].split(",") == ARMS and fields["seeds"] == "2"
    for key in ("heldout_best", "drift_random", "best_minus_random", "best_minus_worst"):
        assert math.isfinite(float(fields[key])), key
    lo, hi = map(float, fields["best_minus_random_ci"].split(","))
    assert lo <= float(fields["best_minus_random"]) <= hi
    assert (tmp_path / "ab.svg").read_text().lstrip().startswith("<?xml")
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS) and "GRAPE-best" in table

    record = json.loads((tmp_path / "results.json").read_text())
    assert not set(record["train_ids"]) & set(record["heldout_ids"])
    picks = {arm: {int(seed): p for seed, p in by_seed.items()} for arm, by_seed in record["picks"].items()}
    best, worst = picks["best"][0], picks["worst"][0]
    assert set(best) == set(worst) == set(record["train_ids"])
    assert all(best[i] != worst[i] for i in best), "best and worst keep the same answer somewhere"
    assert picks["random"][0] != picks["random"][1], "the random arm draws the same for two seeds"
    assert set(picks["reference"][0].values()) == {"gpt-4o-2024-05-13"}
    assert set(picks["most_picked"][0].values()) == {Counter(best.values()).most_common(1)[0][0]}
    for arm, runs in record["runs"].items():
        assert len(runs) == 2 and all(len(r["loss"]) == 3 and len(r["sources"]) == 8 for r in runs.values()), arm
