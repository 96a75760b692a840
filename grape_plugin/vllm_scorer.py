"""An optional scorer on vLLM, for GPU users who already run it (``pip install grape-plugin[vllm]``, ``--scorer vllm``).

vLLM returns prompt log-probabilities for every position; only the response span is summed. Scores match the
transformers scorer within bf16 tolerance. Per-token log-probabilities are kept, per-token ranks are not (this
scorer does not compute them), so metrics that need ranks (``rsr``) refuse its scores with a clear error. It
registers through the ``grape_plugin`` entry-point group, like any third-party plugin, and is not exercised by
the CPU test suite (vLLM needs a GPU).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Optional, Sequence

from .config import GrapeConfig
from .errors import GrapeError
from .hookspecs import hookimpl
from .render import Rendered
from .records import Score


class VLLMScorer:
    """Scores rendered candidates with ``vllm.LLM`` prompt log-probabilities."""

    def __init__(self, cfg: GrapeConfig):
        from .models import resolve_model

        if importlib.util.find_spec("vllm") is None:
            raise GrapeError("--scorer vllm needs vLLM: pip install 'grape-plugin[vllm]'")
        from transformers import AutoTokenizer

        self.cfg, self.name = cfg, resolve_model(cfg.model)
        self.dtype = {"auto": "bfloat16", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        self.identity = f"vllm:{self.name}@{cfg.revision or 'main'}|{self.dtype}"
        self.context_length = getattr(self.tokenizer, "model_max_length", None)
        self.about = {"name": self.name, "revision": cfg.revision, "dtype": self.dtype}
        self.llm: Any = None

    @property
    def loaded(self) -> bool:
        return self.llm is not None

    def load(self) -> None:
        """Start vLLM with the model (once)."""
        from vllm import LLM, SamplingParams

        if self.llm is None:
            cfg = self.cfg
            self.llm = LLM(model=self.name, revision=cfg.revision, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code)
            self.params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]:
        self.load()
        prompts = [{"prompt_token_ids": r.input_ids.tolist()} for r in items]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        scores = []
        for r, out in zip(items, outputs):
            # prompt_logprobs[p] maps token ids at position p (the actual one included) to their log-probability
            lps = [out.prompt_logprobs[p][r.input_ids[p]].logprob for p in range(r.start, r.end)]
            scores.append(Score.of(sum(lps), r.n_tokens, lps))  # no ranks: metrics that need them refuse
        if progress:
            progress(sum(len(r.input_ids) for r in items))
        return scores

    def close(self) -> None:
        self.llm = None


@hookimpl
def grape_register_scorers(register: Callable[[str, Callable[[GrapeConfig], Any]], None]) -> None:
    register("vllm", VLLMScorer)
