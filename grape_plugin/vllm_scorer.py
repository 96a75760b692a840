"""An optional scorer on vLLM, for GPU users who already run it (``pip install grape-plugin[vllm]``, ``--scorer vllm``).

vLLM returns prompt log-probabilities for every position; only the response span is summed. Scores match the
transformers scorer within bf16 tolerance. It registers through the ``grape_plugin`` entry-point group, like any
third-party plugin, and is not exercised by the CPU test suite (vLLM needs a GPU).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from .config import GrapeConfig
from .errors import GrapeError
from .hookspecs import hookimpl
from .render import Rendered
from .scoring import Score


class VLLMScorer:
    """Scores rendered candidates with ``vllm.LLM`` prompt log-probabilities."""

    def __init__(self, cfg: GrapeConfig):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise GrapeError("--scorer vllm needs vLLM: pip install 'grape-plugin[vllm]'") from None
        from .models import resolve_model

        name = resolve_model(cfg.model)
        dtype = {"auto": "bfloat16", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.dtype]
        self.llm = LLM(model=name, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        self.identity = f"vllm:{name}@{cfg.revision or 'main'}|{dtype}"
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]:
        prompts = [{"prompt_token_ids": list(r.input_ids)} for r in items]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        scores = []
        for r, out in zip(items, outputs):
            # prompt_logprobs[p] maps token ids at position p (the actual one included) to their log-probability
            total = sum(out.prompt_logprobs[p][r.input_ids[p]].logprob for p in range(r.start, r.end))
            scores.append(Score(float(total), r.n_tokens))
        if progress:
            progress(sum(len(r.input_ids) for r in items))
        return scores

    def close(self) -> None:
        del self.llm


@hookimpl
def grape_register_scorers(register: Callable[[str, Callable[[GrapeConfig], Any]], None]) -> None:
    register("vllm", VLLMScorer)
