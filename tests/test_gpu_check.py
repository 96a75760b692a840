"""The GPU check in its smoke mode: the whole of benchmarks/gpu_check.py at tiny sizes on whatever device is here."""

from __future__ import annotations

import json
import sys

import torch
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

KEYS = [
    "device", "torch", "exact_max_diff", "exact_ok", "bf16_agreement", "nf4_agreement", "pool_tok_s", "pool_vs_peer",
    "pool_vs_padded", "prefix_vs_peer", "mfu_pool", "mfu_pool_pack", "prefix_shared_vs_peer", "e2e_tok_s",
    "e2e_vs_pool", "e2e_gpu_busy", "e2e_passes", "e2e_shapes", "peak_gib", "mem_ok", "oom_backoff", "attn",
    "sdpa_kernels", "pack_kernels", "shared_kernels", "flash", "targets_met", "errors", "elapsed_s",
]


def test_smoke_runs_the_whole_check_and_ends_with_one_machine_readable_line(tmp_path, capsys):
    res = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu_check ")
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert list(fields) == KEYS
    assert fields["errors"] == "0", res["errors"]
    # exactness: grape-plugin's fp32 scores (padded, shared prefixes, packed) equal one pair at a time
    assert fields["exact_ok"] == "True" and float(fields["exact_max_diff"]) <= 1e-4
    for w in res["exactness"]["workloads"].values():
        assert w["max_diff_fp32_pack"] <= 1e-4 and w["same_winner_fp32"][0] == w["same_winner_fp32"][1]
    assert 0 <= float(fields["bf16_agreement"]) <= 1
    for key in ("pool_tok_s", "pool_vs_peer", "pool_vs_padded", "prefix_vs_peer", "mfu_pool", "mfu_pool_pack",
                "prefix_shared_vs_peer", "e2e_tok_s", "e2e_vs_pool", "e2e_gpu_busy"):
        assert float(fields[key]) > 0, key
    # the end-to-end select: one forward pass per batch, every candidate of its instructions scored
    e2e = res["end_to_end"]
    assert e2e["instructions"] == gpu_check.SMOKE.end_to_end_instructions and e2e["candidates"] > 0
    assert 1 <= int(fields["e2e_shapes"]) <= int(fields["e2e_passes"]) and float(fields["e2e_gpu_busy"]) <= 1
    # every method scores the same pairs the same way (bf16 or fp32 model alike)
    for w in res["throughput"].values():
        assert all(m["max_diff_vs_peer"] < 0.05 for m in w["methods"].values())
    assert fields["attn"] == "sdpa" and fields["sdpa_kernels"] != "none" != fields["shared_kernels"]
    if not torch.cuda.is_available():
        assert fields["peak_gib"] == fields["mem_ok"] == fields["oom_backoff"] == "skipped"
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: str(v) for k, v in saved["summary"].items()} == fields
    assert (tmp_path / "gpu_check.log").read_text().strip().splitlines()[-1] == last


def test_useful_flops_count_a_shared_prompt_once():
    from transformers import LlamaConfig

    from grape_plugin.render import Rendered

    cfg = LlamaConfig(**gpu_check.LLAMA_31_8B)
    items = [Rendered(tuple(range(1000)) + (7,) * 100, 1000, 1100) for _ in range(8)]  # 8 answers, one prompt
    body = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # 6.98 B: 8.03 B less embeddings, head, norms
    positions = 999 + 8 * 101  # the prompt but its last token once; that token and the response per answer
    contexts = 999 * 1000 // 2 + 8 * sum(range(1000, 1101))  # causal: position p attends to p + 1 keys
    head = 8 * 100 * 2 * 4096 * 128256  # only where a response token is predicted
    assert gpu_check.useful_flops(items, cfg) == 2 * body * positions + 4 * 32 * 4096 * contexts + head
