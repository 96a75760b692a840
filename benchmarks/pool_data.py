"""The AlpacaEval pool the benchmarks read by default: the whole pool (805 instructions x 8 generators) at
../shared/data/alpaca_eval_pool.jsonl beside the repository when it is there, else the 111-instruction slice in
data/. The whole pool is built from the AlpacaEval repository's results files (data/README.md says which)."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHOLE_POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool.jsonl"
POOL = WHOLE_POOL if WHOLE_POOL.is_file() else ROOT / "data" / "alpaca_eval_pool_slice.jsonl"


def add_data_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", type=Path, default=POOL,
                    help=f"a pool: one row per (instruction, generator), rows of an instruction together (default: {POOL})")
