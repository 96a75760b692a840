"""The batching replay: a whole select's forward passes recorded without a model, as on CUDA and as on a CPU."""

from __future__ import annotations

import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import replay_batches  # noqa: E402

KEYS = ["tokens", "score_calls", "passes", "shared_rows", "one_row", "median_batch_tokens", "shapes", "padding",
        "cpu_passes", "cpu_shapes", "cpu_padding"]  # fmt: skip


def test_one_score_call_and_no_shared_prompts_on_cuda(pool_file, tiny_model, capsys):
    runs = replay_batches.main(["--data", str(pool_file), "--tokenizer", str(tiny_model), "--batch-tokens", "4096"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("replay ") and list(fields) == KEYS
    cuda, cpu = runs["cuda"], runs["cpu"]
    assert cuda["score_calls"] == cpu["score_calls"] == 1  # the pool is one chunk
    assert cuda["shared_rows"] == 0  # prompts are shared on CPUs only, and only where that saves work
    assert cuda["positions"] >= cuda["tokens"] >= cpu["positions"] * (1 - cpu["padding"])  # shared: run once
    assert 0 <= cuda["padding"] < 0.2
