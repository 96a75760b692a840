"""Scoring speed and memory, side by side in one run: the naive way, plain padded batches, and grape-plugin.

    python benchmarks/bench_scoring.py [--model DIR_OR_GGUF] [--data POOL] [--instructions 10] [--max-length 256]
                                       [--repeats 3]

Workloads (both from the AlpacaEval pool, 8 candidates per instruction; --data defaults to the whole pool at
../shared/data/alpaca_eval_pool.jsonl beside the repository when it is there, else the slice in data/; the whole
pool is built from the AlpacaEval repository's results files, see data/README.md):
  pool    the pool as it is: short prompts, long answers (truncated to --max-length tokens);
  prefix  the same answers behind a long shared prompt (earlier turns: previous pool instructions and an answer),
          so the prompt is about 80% of each pair's tokens.
Methods:
  naive   one pair at a time, full-vocabulary logits for every position, fp32 (what peers do);
  padded  plain padded batches with full logits, fp32;
  ours    grape-plugin's scorer (response-only LM head, shared prefixes, token-budget batches), fp32 and bf16.
The bf16 rows are skipped on a CPU without native bf16 (no AVX512-BF16 or AMX), where bf16 runs several times
slower than fp32; --force-bf16 times them anyway.
Every method counts the same prompt+response tokens per pair. Each figure is the median of --repeats runs; the
score cache is not involved. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pool_data import add_data_option

from grape_plugin.hardware import native_bf16_cpu
from grape_plugin.models import export_model, load_model
from grape_plugin.render import Rendered, fit_length, paper_renderer, render_one
from grape_plugin.scoring import SHARED_ROW_MAX, Score, TransformersScorer, job_rows, row_width, shared_prefixes


def load_groups(n: int, pool: Path) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    with open(pool, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            groups.setdefault(row["id"], []).append(row)
            if len(groups) > n + 3:
                break
    return list(groups.values())


def workloads(tokenizer, n: int, max_length: int, pool: Path) -> dict[str, list[list[Rendered]]]:
    """Rendered candidates per instruction for both workloads (``pool`` needs ``n + 3`` instructions)."""
    render = paper_renderer(tokenizer)
    groups = load_groups(n, pool)
    pool = [[fit_length(render_one(render, [{"role": "user", "content": r["instruction"]}], r["output"]), max_length, "truncate")
             for r in g] for g in groups[:n]]
    prefix = []
    for i, g in enumerate(groups[3 : n + 3]):
        turns = []
        for earlier in groups[i : i + 3]:  # three earlier exchanges make the long shared prompt
            turns += [{"role": "user", "content": earlier[0]["instruction"]},
                      {"role": "assistant", "content": earlier[0]["output"][:400]}]
        prompt = turns + [{"role": "user", "content": g[0]["instruction"]}]
        items = [render_one(render, prompt, r["output"][:300]) for r in g]
        fitted = [f for it in items if (f := fit_length(it, max_length * 2, "truncate")) is not None]
        if fitted:  # a prompt longer than the cut leaves nothing of its responses to score
            prefix.append(fitted)
    return {"pool": pool, "prefix": prefix}


def full_logit_scores(model, batch: list[Rendered]) -> list[Score]:
    """Full logits for every position of a padded batch, fp32 log-softmax over the whole vocabulary (the
    matmuls in the model's own dtype, on its device)."""
    width = max(len(r.input_ids) for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(batch):
        ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[b, : len(r.input_ids)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        lp = model(input_ids=ids, attention_mask=mask if len(batch) > 1 else None).logits.float().log_softmax(-1)
    out = []
    for b, r in enumerate(batch):
        at = torch.arange(r.start - 1, r.end - 1, device=lp.device)
        picked = lp[b, at, torch.tensor(r.input_ids[r.start : r.end], device=lp.device)]
        out.append(Score(float(picked.double().sum()), r.n_tokens))
    return out


def naive(model, items: list[Rendered]) -> list[Score]:
    return [full_logit_scores(model, [r])[0] for r in items]


def padded(model, items: list[Rendered], batch_size: int = 8) -> list[Score]:
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    scores: dict[int, Score] = {}
    for at in range(0, len(order), batch_size):
        idx = order[at : at + batch_size]
        scores.update(zip(idx, full_logit_scores(model, [items[i] for i in idx])))
    return [scores[i] for i in range(len(items))]


def measure(fn, items: list[Rendered], repeats: int) -> dict:
    times, scores = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        scores = fn(items)
        times.append(time.perf_counter() - start)
    return {"tok_s": sum(len(r.input_ids) for r in items) / statistics.median(times), "scores": scores}


def necessary_positions(items: list[Rendered], pair_cost: float = 0.0) -> int:
    """Token positions that must run through the model: each instruction's rows as the scorer plans them, a shared
    prompt once where that saves work at ``pair_cost`` per attention pair (0: wherever it saves positions)."""
    lengths = [len(r.input_ids) for r in items]
    return sum(row_width(row, lengths.__getitem__) for job in shared_prefixes(items)
               for row in job_rows(lengths, job, SHARED_ROW_MAX, pair_cost))  # fmt: skip


def winners(groups: list[list[Rendered]], scores: list[Score]) -> list[int]:
    out, at = [], 0
    for g in groups:
        means = [s.mean for s in scores[at : at + len(g)]]
        out.append(max(range(len(g)), key=lambda i: (means[i], -i)))
        at += len(g)
    return out


def probe_memory(args: argparse.Namespace) -> None:
    """Child process: only our scorer and its model, both workloads; prints the peak RSS in bytes."""
    loaded = load_model(args.model, device="cpu", dtype=args.probe_memory)
    for groups in workloads(loaded.tokenizer, args.instructions, args.max_length, args.data).values():
        TransformersScorer(loaded.as_spec(), batch_tokens=args.batch_tokens).score([r for g in groups for r in g])
    # VmHWM restarts at exec; ru_maxrss would carry the parent's peak over into this child
    with open("/proc/self/status") as fh:
        print(next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")))


def our_peak_rss(args: argparse.Namespace, dtype: str, batch_tokens: int) -> int:
    """Peak RSS of a fresh process that loads one model and scores with grape-plugin (allocator state of the
    other methods would otherwise leak into the figure)."""
    cmd = [sys.executable, __file__, "--probe-memory", dtype, "--instructions", str(args.instructions),
           "--max-length", str(args.max_length), "--batch-tokens", str(batch_tokens), "--model", args.model,
           "--data", str(args.data)]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="folder or .gguf (default: the embedded SmolLM2, exported to a folder)")
    add_data_option(ap)
    ap.add_argument("--instructions", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=256, help="pool pairs are truncated to this many tokens")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 even on a CPU without native bf16")
    ap.add_argument("--probe-memory", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_memory:
        return probe_memory(args)
    if args.model is None or args.model.endswith(".gguf"):
        # base models ship as safetensors folders; GGUF dequantisation alone would dominate load time and memory
        args.model = str(export_model(args.model, tempfile.mkdtemp(prefix="grape-bench-")))

    dtypes = ("fp32", "bf16") if args.force_bf16 or native_bf16_cpu() else ("fp32",)
    if "bf16" not in dtypes:
        print("this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would run slower than fp32 here, "
              "so its rows are skipped (--force-bf16 times them anyway)")
    loaded = {dtype: load_model(args.model, device="cpu", dtype=dtype) for dtype in dtypes}
    fp32 = loaded["fp32"]
    weights = sum(p.numel() * p.element_size() for p in fp32.model.parameters())
    work = workloads(fp32.tokenizer, args.instructions, args.max_length, args.data)
    print(f"model {fp32.name}: {weights / 2**30:.2f} GiB fp32 weights; torch threads {torch.get_num_threads()}")
    results = {}
    for name, groups in work.items():
        items = [r for g in groups for r in g]
        prompt_share = sum(r.start for r in items) / sum(len(r.input_ids) for r in items)
        print(f"\n{name}: {len(groups)} instructions, {len(items)} pairs, "
              f"{sum(len(r.input_ids) for r in items)} tokens, prompt {prompt_share:.0%} of tokens")
        base = measure(lambda xs: naive(fp32.model, xs), items, args.repeats)
        rows = {"naive fp32": base, "padded fp32": measure(lambda xs: padded(fp32.model, xs), items, args.repeats)}
        for dtype, model in loaded.items():
            label = f"ours {dtype}"
            scorer = TransformersScorer(model.as_spec(), batch_tokens=args.batch_tokens)
            rows[label] = measure(scorer.score, items, args.repeats)
            rows[label]["waste"] = scorer.positions_run / args.repeats / necessary_positions(items, scorer.pair_cost)
        want = winners(groups, base["scores"])
        for label, r in rows.items():
            diff = max(abs(a.mean - b.mean) for a, b in zip(r["scores"], base["scores"]))
            agree = sum(a == b for a, b in zip(winners(groups, r["scores"]), want)) / len(groups)
            r.update(ratio=r["tok_s"] / base["tok_s"], diff=diff, agree=agree)
            waste = f"waste {r['waste']:.3f} (padding {1 - 1 / r['waste']:.1%})" if "waste" in r else ""
            print(f"  {label:12s} {r['tok_s']:8.0f} tok/s  x{r['ratio']:.2f}  "
                  f"max |diff| {diff:.1e}  same winner {agree:.0%}  {waste}")
        results[name] = rows
    pool, pre = results["pool"], results["prefix"]
    ours = [r for w in results.values() for k, r in w.items() if k.startswith("ours")]
    print("\ngrape-plugin alone (a fresh process: one model, both workloads), peak RSS:")
    peak = 0
    for dtype in dtypes:
        for batch_tokens in (args.batch_tokens, 4 * args.batch_tokens):
            rss = our_peak_rss(args, dtype, batch_tokens)
            peak = max(peak, rss)
            print(f"  {dtype} --batch-tokens {batch_tokens:6d}: {rss / 2**30:.2f} GiB")
    print(f"weights {weights / 2**30:.2f} GiB; targets: fp32 >= 1.0 (diff <= 1e-4, same winners), bf16 >= 2.0 "
          f"(>= 98% agreement), prefix >= 2.5, peak RSS <= weights + 1 GiB, waste <= 1.05")
    bf16 = pool.get("ours bf16")
    print(f"fp32_speedup={pool['ours fp32']['ratio']:.2f} "
          f"bf16_speedup={format(bf16['ratio'], '.2f') if bf16 else 'skipped'} "
          f"bf16_agreement={format(bf16['agree'], '.3f') if bf16 else 'skipped'} "
          f"prefix_speedup={pre['ours fp32']['ratio']:.2f} "
          f"peak_rss_gib={peak / 2**30:.2f} waste={max(r['waste'] for r in ours):.3f} "
          f"max_abs_diff={max(pool['ours fp32']['diff'], pre['ours fp32']['diff']):.1e}")


if __name__ == "__main__":
    main()
