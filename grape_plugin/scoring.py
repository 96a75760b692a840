"""Score rendered candidates: log-probabilities of the response tokens under the base model.

The transformers scorer runs the model body on length-sorted batches under a token budget, then applies
the LM head and an fp32 log-softmax only at the positions that predict response tokens, in chunks, so no
``[batch tokens x vocab]`` tensor is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from .config import GrapeConfig
from .hookspecs import hookimpl
from .render import Rendered

HEAD_CHUNK_BYTES = 1 << 28  # fp32 logits held at once by the chunked LM head


@dataclass(frozen=True)
class Score:
    """Sum of response-token log-probabilities and their count; ``mean`` is GRAPE's score."""

    logprob_sum: float
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.logprob_sum / self.n_tokens


class Scorer(Protocol):
    """What the pipeline needs from a scorer."""

    tokenizer: Any
    identity: str  # changes whenever scores could change (weights, dtype)

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]: ...

    def close(self) -> None: ...


def token_batches(items: Sequence[Rendered], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of ``items``, longest first, in batches whose padded size stays within ``batch_tokens``."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    batch: list[int] = []
    for i in order:
        longest = len(items[batch[0]].input_ids) if batch else len(items[i].input_ids)
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class TransformersScorer:
    """Scores with a transformers causal LM (see ``models.load_model``)."""

    def __init__(self, loaded: Any, batch_tokens: int = 4096):
        from .errors import GrapeError

        self.model, self.tokenizer, self.identity = loaded.model, loaded.tokenizer, loaded.identity
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        if self.body is self.model or self.head is None:
            raise GrapeError(f"{type(self.model).__name__}: cannot separate the model body from its LM head")
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.batch_tokens = batch_tokens

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]:
        results: list[Optional[Score]] = [None] * len(items)
        for batch in token_batches(items, self.batch_tokens):
            for i, s in zip(batch, self._score_backing_off([items[i] for i in batch])):
                results[i] = s
            if progress:
                progress(sum(len(items[i].input_ids) for i in batch))
        return results  # type: ignore[return-value]

    def _score_backing_off(self, batch: list[Rendered]) -> list[Score]:
        """Score a batch; on out-of-memory, halve it and go on."""
        try:
            return self._score_batch(batch)
        except RuntimeError as exc:
            if len(batch) == 1 or not is_oom(exc):
                raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return self._score_backing_off(batch[:half]) + self._score_backing_off(batch[half:])

    def _score_batch(self, batch: list[Rendered]) -> list[Score]:
        import torch

        device = self.head.weight.device
        width = max(len(r.input_ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[b, : len(r.input_ids)] = 1
        # position p predicts token p + 1: response tokens [start, end) are predicted at [start - 1, end - 1)
        rows = torch.cat([torch.full((r.n_tokens,), b) for b, r in enumerate(batch)])
        pos = torch.cat([torch.arange(r.start - 1, r.end - 1) for r in batch])
        targets = ids[rows, pos + 1].to(device)
        with torch.inference_mode():
            hidden = self.body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            picked = hidden[rows.to(device), pos.to(device)]
            del hidden
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
            chunk = max(1, HEAD_CHUNK_BYTES // (4 * self.head.weight.shape[0]))
            for c in range(0, len(pos), chunk):
                logits = self.head(picked[c : c + chunk]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                lp = logits.log_softmax(-1).gather(1, targets[c : c + chunk, None]).squeeze(1)
                sums.index_add_(0, rows[c : c + chunk].to(device), lp.double())
        return [Score(float(s), r.n_tokens) for s, r in zip(sums.tolist(), batch)]

    def close(self) -> None:
        """Free the model (and its GPU memory) before the host loads the training model."""
        import gc

        import torch

        del self.model, self.body, self.head
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def transformers_scorer(cfg: GrapeConfig) -> TransformersScorer:
    from .models import load_model

    loaded = load_model(
        cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    return TransformersScorer(loaded, cfg.batch_tokens)


@hookimpl
def grape_register_scorers(register: Callable[[str, Callable[[GrapeConfig], Scorer]], None]) -> None:
    register("transformers", transformers_scorer)
