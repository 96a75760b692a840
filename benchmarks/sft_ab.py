"""Does GRAPE's selection help a fine-tune? A small, fair A/B: arms selected with grape-plugin, trained identically.

    python benchmarks/sft_ab.py [--model M] [--data POOL] [--out DIR] [--steps N ...]   # defaults: one GPU, minutes
    python benchmarks/sft_ab.py --smoke                                                 # everything, tiny, on a CPU

Data: a pool in long rows (``id``, ``instruction``, ``output``, ``generator``); by default
../shared/data/alpaca_eval_pool.jsonl (805 AlpacaEval instructions x 8 models) when it exists, else the shipped
data/alpaca_eval_pool_slice.jsonl. The split is by instruction: an id is held out when the first 8 hex digits of
sha256(id), read as a number, are divisible by 5 (about 20%); ``--train`` and ``--heldout`` then keep the first N of
each side in file order.

Arms, one response per train instruction, selected through grape-plugin's API with the model being fine-tuned, the
training template and max_length = ``--seq-len`` (longer answers are scored as they are trained: cut): ``best``
(GRAPE, mean), ``worst``, ``random`` (a fresh draw per seed), ``best_<alt-metric>``, ``most_picked`` (every answer of
the source GRAPE-best picks most often) and ``reference`` (every answer of ``--reference``, gpt-4o by default).

Training, the same for every arm: transformers' Trainer, a full fine-tune, ``--steps`` steps of ``--batch`` rows at
``--lr`` (cosine, 10% warmup), sequences cut at ``--seq-len``, loss on the response and its end-of-turn tokens only
(labels -100 on the prompt), rendered with ``--template`` (the model's chat template by default). A seed sets the
data order (and the random arm's draw).

Evaluation on the held-out instructions, with grape-plugin's scorer in fp32: the mean log-prob per token of every
source's answer (its first ``--eval-tokens`` tokens), per source and averaged over the sources; drift: the same for
the base model's own greedy answers (``--greedy-tokens`` new tokens, generated once), after training minus before.
The report: per arm, the mean and 95% t-interval over seeds, each arm's difference from random (Welch interval), the
per-source table, the loss curves, a plot (``ab.svg``), a plain reading, and a machine-readable last line.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from grape_plugin import GrapeConfig, run, write
from grape_plugin.render import (IGNORE_INDEX, Rendered, TextRenderer, chat_renderer, fit_length, paper_renderer,
                                 render_one)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool.jsonl"
SLICE = ROOT / "data" / "alpaca_eval_pool_slice.jsonl"
SOURCE = "generator"
GREEDY = "base model, greedy"  # the source name of the base model's own answers
# Student's t, 97.5% quantile, for 1..30 degrees of freedom (above 30: 1.96 would be 2% too narrow at most)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
SMOKE = {"train": 8, "heldout": 4, "steps": 3, "batch": 2, "seq_len": 128, "seeds": 2, "eval_tokens": 32,
         "greedy_tokens": 8, "lr": 1e-3}  # fmt: skip
RENDERERS: dict[str, Callable[[Any], TextRenderer]] = {"chat": chat_renderer, "paper": paper_renderer}

Row = dict[str, Any]


def log(message: str) -> None:
    print(f"[sft_ab] {message}", file=sys.stderr, flush=True)


# --- statistics ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A mean (or a difference of means) and its 95% interval."""

    mean: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"

    @property
    def verdict(self) -> str:
        """Above, below, or not distinguishable from zero at 95%."""
        return "above" if self.lo > 0 else "below" if self.hi < 0 else "level"


def t975(df: float) -> float:
    """Student's t 97.5% quantile; a fractional df is rounded down (a slightly wider interval)."""
    return math.inf if df < 1 else T975[int(df) - 1] if df < len(T975) + 1 else 1.96


def interval(xs: Sequence[float]) -> Interval:
    mean = statistics.fmean(xs)
    half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.inf
    return Interval(mean, mean - half, mean + half)


def difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of ``a`` minus mean of ``b``, Welch's interval (the arms' seeds are independent runs)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    d, half = statistics.fmean(a) - statistics.fmean(b), t975(df) * math.sqrt(va + vb)
    return Interval(d, d - half, d + half)


# --- data and arms -------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[Row]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def held_out(instruction_id: str) -> bool:
    """The split rule: held out when sha256(id)'s first 8 hex digits are divisible by 5."""
    return int(hashlib.sha256(instruction_id.encode()).hexdigest()[:8], 16) % 5 == 0


def split(rows: Sequence[Row], n_train: int, n_heldout: int) -> tuple[list[Row], list[Row]]:
    """The rows of the first ``n_train`` train and ``n_heldout`` held-out instructions (0: all of them)."""
    by_id: dict[str, list[Row]] = {}
    for row in rows:
        by_id.setdefault(str(row["id"]), []).append(row)
    train_ids, heldout_ids = ([i for i in by_id if held_out(i) == side] for side in (False, True))
    first = lambda ids, n: [r for i in (ids[:n] if n else ids) for r in by_id[i]]  # noqa: E731
    return first(train_ids, n_train), first(heldout_ids, n_heldout)


def select_arm(pool: Path, out: Path, cfg: GrapeConfig) -> list[Row]:
    """Select with grape-plugin's API and write the arm as a dataset (``out/selected.jsonl`` and the report)."""
    data, selection = run(pool, cfg)
    return read_jsonl(write(data, selection, out)["selected"])


def make_arms(pool: Path, rows: Sequence[Row], model: str, args: argparse.Namespace) -> dict[str, dict[int, list[Row]]]:
    """Each arm's training rows per seed (the same rows for every seed but in the random arm)."""
    options = {"model": model, "template": args.template, "max_length": args.seq_len, "over_length": "truncate",
               "cache_dir": args.out / "cache"}  # fmt: skip
    arms_dir = args.out / "arms"
    pick = lambda name, **kw: select_arm(pool, arms_dir / name, GrapeConfig(**options, **kw))  # noqa: E731
    fixed = {"best": pick("best"), "worst": pick("worst", strategy="worst"),
             f"best_{args.alt_metric}": pick(f"best_{args.alt_metric}", metric=args.alt_metric)}  # fmt: skip
    top = Counter(r[SOURCE] for r in fixed["best"]).most_common(1)[0][0]
    for name, source in (("most_picked", top), ("reference", args.reference)):
        if name == "reference" and source == top:
            log(f"the reference source {source} is also the one GRAPE picks most: one arm for both")
            continue
        chosen = [r for r in rows if r[SOURCE] == source]
        if not chosen:
            log(f"no answers from source {source!r} in the pool: no {name} arm")
            continue
        fixed[name] = read_jsonl(write_jsonl(arms_dir / name / "selected.jsonl", chosen))
    arms = {name: {seed: picked for seed in args.seed_list} for name, picked in fixed.items()}
    arms["random"] = {seed: pick(f"random-{seed}", strategy="random", seed=seed) for seed in args.seed_list}
    order = ["best", "worst", "random", f"best_{args.alt_metric}", "most_picked", "reference"]
    return {name: arms[name] for name in order if name in arms}


# --- training ------------------------------------------------------------------------------------------------------
def user_turn(row: Row) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["instruction"]}]


def features(rows: Sequence[Row], render: TextRenderer, seq_len: int) -> list[dict[str, list[int]]]:
    """Token ids cut at ``seq_len``, labelled from the first response token on (prompt positions get -100)."""
    out = []
    for row in rows:
        item = fit_length(render_one(render, user_turn(row), row["output"]), seq_len, "truncate")
        if item is None:  # the prompt alone is longer than seq_len: left out of every arm alike
            continue
        ids = item.input_ids.tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * item.start + ids[item.start :]})
    return out


def train(model_dir: str, feats: list[dict[str, list[int]]], tokenizer: Any, args: argparse.Namespace,
          seed: int) -> tuple[Any, list[float]]:  # fmt: skip
    """Fine-tune a fresh copy of the base model on ``feats``; the model (in eval mode) and its loss per step."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainingArguments)  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, bf16=args.dtype == "bf16", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=settings, train_dataset=Dataset.from_list(feats), data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer.model.eval(), [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --- evaluation ----------------------------------------------------------------------------------------------------
def greedy_answers(model: Any, render: TextRenderer, rows: Sequence[Row], max_new: int) -> list[str]:
    """The model's greedy answer to each instruction, prompted exactly as in training (the rendered ids before the
    response span of a one-character placeholder answer)."""
    import torch

    tok, device = render.tokenizer, model.device
    answers = []
    for row in rows:
        prompt = render_one(render, user_turn(row), "x")
        ids = torch.as_tensor(prompt.input_ids[: prompt.start], dtype=torch.long, device=device)[None]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def eval_items(rows: Sequence[Row], greedy: dict[str, tuple[Row, str]], render: TextRenderer,
               eval_tokens: int) -> list[tuple[str, Rendered]]:  # fmt: skip
    """(source, rendered answer cut to its first ``eval_tokens`` tokens) for every held-out answer and greedy answer."""
    pairs = [(r[SOURCE], r, r["output"]) for r in rows] + [(GREEDY, r, answer) for r, answer in greedy.values()]
    items = []
    for source, row, answer in pairs:
        item = render_one(render, user_turn(row), answer)
        items.append((source, fit_length(item, item.start + eval_tokens, "truncate")))
    return items


def evaluate(model: Any, tokenizer: Any, items: Sequence[tuple[str, Rendered]], batch_tokens: int) -> dict[str, float]:
    """Mean per-token log-prob of each source's answers, averaged over instructions, by grape-plugin's scorer."""
    from grape_plugin.models import LoadedModel
    from grape_plugin.scoring import TransformersScorer

    scorer = TransformersScorer(LoadedModel(model, tokenizer, "sft_ab", "sft_ab").as_spec(), batch_tokens)
    by_source: dict[str, list[float]] = {}
    for (source, _), score in zip(items, scorer.score([item for _, item in items])):
        by_source.setdefault(source, []).append(score.mean)
    return {source: statistics.fmean(means) for source, means in by_source.items()}


def measures(scores: dict[str, float], before: dict[str, float], losses: list[float]) -> dict[str, Any]:
    """One run's numbers: held-out log-prob per source and averaged over sources, drift, loss curve."""
    sources = {s: v for s, v in scores.items() if s != GREEDY}
    drift = scores[GREEDY] - before[GREEDY] if GREEDY in scores else math.nan
    tail = losses[-max(1, len(losses) // 5) :]
    return {"heldout": statistics.fmean(sources.values()), "drift": drift, "greedy": scores.get(GREEDY, math.nan),
            "loss_end": statistics.fmean(tail), "sources": sources, "loss": losses}  # fmt: skip


# --- report --------------------------------------------------------------------------------------------------------
def summarize(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm and measure: the interval over seeds and the difference from random (None for random itself)."""
    values = lambda arm, key: [r[key] for r in results[arm].values()]  # noqa: E731
    return {arm: {k: v for key in ("heldout", "drift", "loss_end") for k, v in (
        (key, interval(values(arm, key))),
        (f"{key}_vs_random", None if arm == "random" else difference(values(arm, key), values("random", key))),
    )} for arm in results}  # fmt: skip


def best_minus_worst(results: dict[str, dict[int, dict[str, Any]]]) -> Interval:
    heldout = lambda arm: [r["heldout"] for r in results[arm].values()]  # noqa: E731
    return difference(heldout("best"), heldout("worst"))


def mix(rows: Sequence[Row]) -> str:
    """The two sources an arm trains on most, with their shares."""
    counts = Counter(r[SOURCE] for r in rows)
    return ", ".join(f"{s} {n / len(rows):.0%}" for s, n in counts.most_common(2))


def tables(summary: dict[str, dict[str, Any]], results: dict[str, dict[int, dict[str, Any]]],
           arms: dict[str, dict[int, list[Row]]], before: dict[str, float]) -> str:  # fmt: skip
    """The main table (intervals and differences from random) and the per-source table (means over seeds)."""
    lines = ["| arm | trains on | held-out log-prob/token | vs random | drift on base's greedy answers | vs random | "
             "train loss (last 20%) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, s in summary.items():
        trains = "a fresh random draw per seed" if arm == "random" else mix(next(iter(arms[arm].values())))
        vs = lambda key: "-" if s[f"{key}_vs_random"] is None else str(s[f"{key}_vs_random"])  # noqa: E731
        lines.append(f"| {arm} | {trains} | {s['heldout']} | {vs('heldout')} | {s['drift']} | {vs('drift')} | "
                     f"{s['loss_end'].mean:.3f} |")  # fmt: skip
    sources = [s for s in before if s != GREEDY]
    lines += ["", "| arm | " + " | ".join(sources) + " | " + GREEDY + " |", "|---" * (len(sources) + 2) + "|"]
    lines.append("| (base model) | " + " | ".join(f"{before[s]:.3f}" for s in sources) + f" | {before[GREEDY]:.3f} |")
    for arm, runs in results.items():
        per = [statistics.fmean(r["sources"][s] for r in runs.values()) for s in sources]
        greedy = statistics.fmean(r["greedy"] for r in runs.values())
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in per) + f" | {greedy:.3f} |")
    return "\n".join(lines)


def reading(summary: dict[str, dict[str, Any]], worst_gap: Interval, args: argparse.Namespace, n_heldout: int,
            n_sources: int) -> str:  # fmt: skip
    """A plain paragraph: did best beat random and worst, on held-out likelihood and drift?"""
    best = summary["best"]
    said = {"above": "beat", "below": "fell below", "level": "was not distinguishable from"}
    drift_said = {"above": "smaller than", "below": "larger than", "level": "not distinguishable from"}
    return (
        f"On {n_heldout} held-out instructions, GRAPE-best {said[best['heldout_vs_random'].verdict]} random on the "
        f"held-out log-probability averaged over {n_sources} sources ({best['heldout_vs_random']} nats/token, 95% "
        f"interval over {len(args.seed_list)} seeds) and {said[worst_gap.verdict]} GRAPE-worst ({worst_gap}). Its "
        f"drift from the base model's own greedy answers was {drift_said[best['drift_vs_random'].verdict]} random's "
        f"({best['drift_vs_random']}). Scale: {args.steps} steps of {args.batch} rows of at most {args.seq_len} "
        f"tokens, lr {args.lr:g}; the intervals cover seed-to-seed variation only, not the choice of instructions."
    )


def plot(path: Path, summary: dict[str, dict[str, Any]], results: dict[str, dict[int, dict[str, Any]]],
         before: dict[str, float]) -> Path:  # fmt: skip
    """Held-out log-prob and drift per arm (mean, 95% interval) and the mean loss curve per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "heldout", "held-out log-prob / token (avg over sources)"),
                           (axes[1], "drift", "drift: base's greedy answers, after - before")):  # fmt: skip
        means = [summary[a][key].mean for a in arms]
        errs = [[m - summary[a][key].lo for a, m in zip(arms, means)], [summary[a][key].hi - m for a, m in zip(arms, means)]]
        ax.errorbar(arms, means, yerr=errs, fmt="o", capsize=4, color="#4c78a8")
        zero = statistics.fmean(v for s, v in before.items() if s != GREEDY) if key == "heldout" else 0.0
        ax.axhline(zero, color="grey", ls="--", label="base model" if key == "heldout" else "no change")
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    for arm, runs in results.items():
        curves = [r["loss"] for r in runs.values()]
        axes[2].plot(range(1, len(curves[0]) + 1), [statistics.fmean(c) for c in zip(*curves)], label=arm)
    axes[2].set(title="training loss (mean over seeds)", xlabel="step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def last_line(summary: dict[str, dict[str, Any]], worst_gap: Interval, args: argparse.Namespace, n_heldout: int,
              seconds: float) -> str:  # fmt: skip
    fields: dict[str, Any] = {"arms": ",".join(summary), "seeds": len(args.seed_list), "heldout_instructions": n_heldout}
    fields.update({f"heldout_{a}": f"{s['heldout'].mean:.4f}" for a, s in summary.items()})
    fields.update({f"drift_{a}": f"{s['drift'].mean:.4f}" for a, s in summary.items()})
    for name, gap in (("best_minus_random", summary["best"]["heldout_vs_random"]), ("best_minus_worst", worst_gap)):
        fields.update({name: f"{gap.mean:.4f}", f"{name}_ci": f"{gap.lo:.4f},{gap.hi:.4f}"})
    fields["seconds"] = round(seconds)
    return "sft_ab " + " ".join(f"{k}={v}" for k, v in fields.items())


# --- the run -------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GRAPE A/B: arms selected with grape-plugin, fine-tuned identically.")
    p.add_argument("--model", help="a transformers folder or hub id, both scored and trained (default: the embedded "
                                   "SmolLM2-135M-Instruct, exported once into OUT/base-model)")  # fmt: skip
    p.add_argument("--data", type=Path, help=f"pool in long rows (default: {POOL} if present, else {SLICE.name})")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "sft_ab", help="work folder (default: out/sft_ab)")
    p.add_argument("--train", type=int, default=0, help="train instructions, the first N of the split (0: all)")
    p.add_argument("--heldout", type=int, default=100, help="held-out instructions, the first N of the split (0: all)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (longer rows are cut)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (cosine, 10%% warmup)")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm (seeds 0..N-1)")
    p.add_argument("--template", choices=list(RENDERERS), default="chat", help="rendering for selection, training "
                                                                                "and evaluation")  # fmt: skip
    p.add_argument("--alt-metric", default="min_k", help="the fit metric of the best_<metric> arm (min_k, rsr, ...)")
    p.add_argument("--reference", default="gpt-4o-2024-05-13", help="the fixed source of the reference arm")
    p.add_argument("--eval-tokens", type=int, default=256, help="held-out answers are scored on their first N tokens")
    p.add_argument("--greedy-tokens", type=int, default=128, help="new tokens of the base model's greedy answers")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision (mixed; auto: bf16 on CUDA, fp32 on CPU); scoring is always fp32")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=4096, help="the scorer's padded tokens per forward pass")
    p.add_argument("--smoke", action="store_true", help="a tiny random model on the shipped slice, sizes: %s" % SMOKE)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.seed_list = list(range(args.seeds))
    return args


def base_model(args: argparse.Namespace) -> str:
    """The model folder or hub id to fine-tune (and score with)."""
    if args.model:
        return args.model
    folder = args.out / ("tiny-model" if args.smoke else "base-model")
    if not (folder / "config.json").is_file():
        if args.smoke:
            sys.path.insert(0, str(ROOT))
            from tests.helpers import build_tiny_model

            build_tiny_model(folder)
        else:
            from grape_plugin.models import export_model

            export_model(None, folder)
    return str(folder)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    if args.dtype == "auto":
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = base_model(args)
    data = args.data or (POOL if POOL.exists() and not args.smoke else SLICE)
    train_rows, heldout_rows = split(read_jsonl(data), args.train, args.heldout)
    pool = write_jsonl(args.out / "train_pool.jsonl", train_rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    render = RENDERERS[args.template](tokenizer)
    arms = make_arms(pool, train_rows, model_dir, args)
    log(f"selected {len(arms)} arms in {time.perf_counter() - started:.0f} s")

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = base.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    firsts: dict[str, Row] = {}
    for row in heldout_rows:
        firsts.setdefault(row["id"], row)
    answers = greedy_answers(base, render, list(firsts.values()), args.greedy_tokens)
    greedy = {i: (r, a) for (i, r), a in zip(firsts.items(), answers) if a}
    log(f"base model's greedy answers: {len(greedy)} of {len(firsts)} non-empty")
    items = eval_items(heldout_rows, greedy, render, args.eval_tokens)
    before = evaluate(base, tokenizer, items, args.batch_tokens)
    del base

    results: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, by_seed in arms.items():
        for seed, rows in by_seed.items():
            clock = time.perf_counter()
            model, losses = train(model_dir, features(rows, render, args.seq_len), tokenizer, args, seed)
            run_result = measures(evaluate(model, tokenizer, items, args.batch_tokens), before, losses)
            results.setdefault(arm, {})[seed] = run_result
            del model
            gc.collect()
            log(f"{arm} seed {seed}: {time.perf_counter() - clock:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                f"held-out {run_result['heldout']:.4f}, drift {run_result['drift']:+.4f}")  # fmt: skip

    summary, worst_gap = summarize(results), best_minus_worst(results)
    n_heldout, n_sources = len(firsts), len(before) - (GREEDY in before)
    text = tables(summary, results, arms, before)
    paragraph = reading(summary, worst_gap, args, n_heldout, n_sources)
    plot(args.out / "ab.svg", summary, results, before)
    (args.out / "table.md").write_text(f"{text}\n\n{paragraph}\n", encoding="utf-8")
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": model_dir,
        "data": str(data), "train_ids": list(dict.fromkeys(r["id"] for r in train_rows)), "heldout_ids": list(firsts),
        "picks": {a: {s: {r["id"]: r[SOURCE] for r in rows} for s, rows in by.items()} for a, by in arms.items()},
        "before": before, "runs": results, "best_minus_worst": vars(worst_gap),
        "summary": {a: {k: v and vars(v) for k, v in s.items()} for a, s in summary.items()},
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{text}\n\n{paragraph}\n")
    print(last_line(summary, worst_gap, args, n_heldout, time.perf_counter() - started))


if __name__ == "__main__":
    main()
