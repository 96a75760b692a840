"""The scale benchmark's smoke test: a tiny pool through 1 and 2 gloo ranks, and its machine-readable last line."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

KEYS = ["pipeline_tok_s", "tokenizer_tok_s", "rss_bytes_per_token", "rank_share", "rerun_fraction", "identical_2_ranks"]


def test_bench_scale_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    fields = dict(part.split("=") for part in done.stdout.strip().splitlines()[-1].split())
    assert list(fields) == KEYS and fields["identical_2_ranks"] == "yes"
    assert float(fields["pipeline_tok_s"]) > 0 and float(fields["tokenizer_tok_s"]) > 0
    assert 0.5 <= float(fields["rank_share"]) <= 1
