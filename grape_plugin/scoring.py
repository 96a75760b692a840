"""Score rendered candidates: log-probabilities of the response tokens under the base model.

The transformers scorer runs the model body on length-sorted batches under a token budget, then applies
the LM head and an fp32 log-softmax only at the positions that predict response tokens, in chunks, so no
``[batch tokens x vocab]`` tensor is ever built. Each response token's log-probability and rank come from the
same chunk.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

from .config import GrapeConfig
from .hookspecs import hookimpl
from .records import Score
from .render import Rendered

if TYPE_CHECKING:
    from .models import ModelSpec

HEAD_CHUNK_BYTES = 1 << 26  # fp32 logits held at once by the chunked LM head (64 MiB)
MAX_PADDING = 0.04  # a padded batch is cut rather than let padding pass this fraction of its positions
SHARE_MIN_SAVED = 256  # share an instruction's prefix when that saves at least this many token positions


class Scorer(Protocol):
    """What the pipeline needs from a scorer (docs/plugins.md). ``tokenizer`` and ``identity`` must not need the
    weights: a scorer loads them on its first ``score`` call, so a fully cached run never does. Optional members
    (``components.SCORER``): ``context_length``, ``loaded``, ``about`` and ``close``."""

    tokenizer: Any
    identity: str  # changes whenever scores could change (weights, dtype)
    context_length: Optional[int]  # the most positions the model takes (None: unknown)
    loaded: Optional[bool]  # whether the weights are in memory (None: the scorer does not say)
    about: Mapping[str, Any]  # for reports: the model's name, revision, dtype, device

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]: ...

    def close(self) -> None: ...


def token_batches(items: Sequence[Rendered], batch_tokens: int, max_padding: float = 1.0) -> Iterator[list[int]]:
    """Indices of ``items``, longest first, in batches whose padded size stays within ``batch_tokens`` and whose
    padding stays within the fraction ``max_padding`` of it."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    batch: list[int] = []
    filled = 0
    for i in order:
        size = len(items[i].input_ids)
        padded = len(items[batch[0]].input_ids) * (len(batch) + 1) if batch else size
        if batch and (padded > batch_tokens or 1 - (filled + size) / padded > max_padding):
            yield batch
            batch, filled = [], 0
        batch.append(i)
        filled += size
    if batch:
        yield batch


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def shared_prefixes(items: Sequence[Rendered], min_saved: int = SHARE_MIN_SAVED) -> list[tuple[int, list[int]]]:
    """Plan the work as (shared prefix length, item indices) jobs; length 0 means nothing is shared.

    Items whose tokens before the last prompt token are identical (the candidates of one instruction) form a
    job whose prefix runs once, when that saves at least ``min_saved`` token positions. The last prompt token
    stays with each candidate, since its output predicts the first response token.
    """
    by_prompt: dict[bytes, list[int]] = {}
    for i, item in enumerate(items):
        by_prompt.setdefault(item.input_ids[: item.start - 1].tobytes(), []).append(i)
    jobs, alone = [], []
    for prefix, members in by_prompt.items():
        length = len(prefix) // 4  # int32 ids
        if length * (len(members) - 1) >= min_saved:
            jobs.append((length, members))
        else:
            alone += members
    return [(0, sorted(alone))] + jobs if alone else jobs


class TransformersScorer:
    """Scores with a transformers causal LM, described by a ``models.ModelSpec`` and loaded on first use.

    ``pack`` runs each batch as one padding-free row whose position ids restart per sequence; it is the
    default with flash-attention (its varlen kernel keeps sequences apart without a dense mask), while SDPA
    and eager attention get length-sorted padded batches.
    """

    def __init__(
        self,
        spec: "ModelSpec",
        batch_tokens: int = 4096,
        pack: Optional[bool] = None,
        share_prefixes: bool = True,
        max_padding: float = MAX_PADDING,
    ):
        self.spec, self.tokenizer, self.identity, self.context_length = spec, spec.tokenizer, spec.identity, spec.context_length
        self.batch_tokens = batch_tokens
        self.max_padding = max_padding
        self.pack_option = pack
        self.share_prefixes = share_prefixes
        self.model: Any = None
        self.positions_run = 0  # token positions through the model body, padding and prefixes included

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def about(self) -> Mapping[str, Any]:
        """The model's name, revision, dtype and device, for reports."""
        return {"name": self.spec.name, **self.spec.about}

    def load(self) -> None:
        """Load the weights (once) and split the model into its body and its LM head."""
        from .errors import GrapeError

        if self.model is not None:
            return
        model = self.spec.load()
        if hasattr(model, "get_base_model"):  # a peft model: its adapters stay active inside the wrapped model
            model = model.get_base_model()
        self.model, self.body, self.head = model, model.base_model, model.get_output_embeddings()
        if self.body is model or self.head is None:
            raise GrapeError(f"{type(model).__name__}: cannot separate the model body from its LM head")
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        attn = getattr(model.config, "_attn_implementation", None) or ""
        self.pack = self.pack_option if self.pack_option is not None else attn.startswith("flash_attention")
        # transformers renamed ``past_key_values`` to ``cache``; the host frameworks pin releases on both sides
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"

    def score(self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None) -> list[Score]:
        self.load()
        results: list[Optional[Score]] = [None] * len(items)
        jobs = shared_prefixes(items) if self.share_prefixes else [(0, list(range(len(items))))]
        for shared, members in jobs:
            prefix = self._prefix_cache(items[members[0]].input_ids[:shared]) if shared else None
            sub = [items[i] for i in members]
            tails = [Rendered(r.input_ids[shared:], 0, 0) for r in sub]
            for batch in token_batches(tails, self.batch_tokens, 1.0 if self.pack and not shared else self.max_padding):
                scores = self._score_backing_off([sub[b] for b in batch], shared, prefix)
                for b, s in zip(batch, scores):
                    results[members[b]] = s
                if progress:
                    progress(sum(len(sub[b].input_ids) for b in batch))
        return results  # type: ignore[return-value]

    def _prefix_cache(self, prefix: Any) -> Any:
        """The key/value cache of a shared prefix, computed once."""
        import torch

        self.positions_run += len(prefix)
        with torch.inference_mode():
            ids = torch.as_tensor(prefix, dtype=torch.long, device=self.head.weight.device)[None]
            return self.body(input_ids=ids, use_cache=True).past_key_values

    def _score_backing_off(self, batch: list[Rendered], shared: int, prefix: Any) -> list[Score]:
        """Score a batch; on out-of-memory, halve it and go on."""
        try:
            return self._score_batch(batch, shared, prefix)
        except RuntimeError as exc:
            if len(batch) == 1 or not is_oom(exc):
                raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return self._score_backing_off(batch[:half], shared, prefix) + self._score_backing_off(batch[half:], shared, prefix)

    def _score_batch(self, batch: list[Rendered], shared: int = 0, prefix: Any = None) -> list[Score]:
        """Run the body on ``batch`` (after a ``shared``-token prefix whose cache is ``prefix``), then the head."""
        import copy

        import numpy as np
        import torch

        device = self.head.weight.device
        tails = [r.input_ids[shared:] for r in batch]
        # position p predicts token p + 1: response tokens [start, end) are predicted at [start - 1, end - 1)
        rows = torch.cat([torch.full((r.n_tokens,), b) for b, r in enumerate(batch)]).to(device)
        targets = torch.as_tensor(np.concatenate([r.input_ids[r.start : r.end] for r in batch]), dtype=torch.long, device=device)
        if self.pack and prefix is None:
            flat = torch.as_tensor(np.concatenate(tails), dtype=torch.long)[None]
            offsets = torch.tensor([0] + [len(t) for t in tails]).cumsum(0)
            pos = torch.cat([torch.arange(r.start - 1, r.end - 1) + offsets[b] for b, r in enumerate(batch)])
            # no cache: transformers only derives the per-sequence (block-diagonal) mask from position ids without one
            positions = torch.cat([torch.arange(len(t)) for t in tails])[None]
            inputs = {"input_ids": flat, "position_ids": positions, "use_cache": False}
            rows_in, pos_in = torch.zeros_like(pos), pos
        else:
            width = max(len(t) for t in tails)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for b, tail in enumerate(tails):
                ids[b, : len(tail)] = torch.from_numpy(tail)
                mask[b, shared : shared + len(tail)] = 1
            inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(batch))
                inputs.update({self.cache_kwarg: cache, "use_cache": True})
            rows_in = rows
            pos_in = torch.cat([torch.arange(r.start - 1 - shared, r.end - 1 - shared) for r in batch])
        self.positions_run += inputs["input_ids"].numel()
        with torch.inference_mode():
            hidden = self.body(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}).last_hidden_state
            picked = hidden[rows_in.to(device), pos_in.to(device)]
            del hidden
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
            lps, ranks = [], []
            chunk = max(1, HEAD_CHUNK_BYTES // (4 * self.head.weight.shape[0]))
            for c in range(0, len(targets), chunk):
                logits = self.head(picked[c : c + chunk]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                target = targets[c : c + chunk, None]
                lp = logits.log_softmax(-1).gather(1, target).squeeze(1)
                sums.index_add_(0, rows[c : c + chunk], lp.double())
                # rank: vocabulary entries with a strictly higher logit than the actual token (0 = the top choice)
                ranks.append((logits > logits.gather(1, target)).sum(-1, dtype=torch.int32).cpu())
                lps.append(lp.cpu())
        sizes = [r.n_tokens for r in batch]
        per_token = zip(torch.cat(lps).split(sizes), torch.cat(ranks).split(sizes))
        return [Score.of(s, n, lp.numpy(), rk.numpy()) for s, n, (lp, rk) in zip(sums.tolist(), sizes, per_token)]

    def close(self) -> None:
        """Free the model (and its GPU memory) before the host loads the training model."""
        import gc

        import torch

        if self.model is None:
            return
        self.model = self.body = self.head = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def transformers_scorer(cfg: GrapeConfig) -> TransformersScorer:
    """The scorer for ``cfg.model``: its tokenizer now, its weights when something is left to score."""
    from .models import model_spec

    spec = model_spec(
        cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    return TransformersScorer(spec, cfg.batch_tokens)


@hookimpl
def grape_register_scorers(register: Callable[[str, Callable[[GrapeConfig], Scorer]], None]) -> None:
    register("transformers", transformers_scorer)
