"""Score rendered candidates: log-probabilities of the response tokens under the base model.

The transformers scorer runs the model body on length-sorted batches under a token budget, then applies the LM
head only at the positions that predict response tokens, in blocks of rows, so no ``[batch tokens x vocab]``
tensor is ever built. Each block's logits get an fp32 log-softmax; a response token's rank (how many vocabulary
entries score higher) comes from the same block, only when per-token values are kept. A batch's results stay on
the device until the batch is done and reach the host in one copy, while the next batch is already running.
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

HEAD_BLOCK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 29}  # fp32 logits of one block of LM head rows (64 / 512 MiB)
MAX_PADDING = 0.04  # a batch is cut rather than let padding pass this fraction of its positions, ...
GPU_MIN_FILL = 0.5  # ... on a GPU only once it holds this fraction of the token budget (a small pass costs more)
SHARE_MIN_SAVED = 256  # share an instruction's prefix when that saves at least this many token positions

Done = Callable[[Sequence[int], Sequence[Score]], None]  # indices of the items scored, and their scores


class Scorer(Protocol):
    """What the pipeline needs from a scorer (docs/plugins.md). ``tokenizer`` and ``identity`` must not need the
    weights: a scorer loads them on its first ``score`` call (or ``load``), so a fully cached run never does.
    Optional members (``components.SCORER``): ``context_length``, ``loaded``, ``about``, ``load``, ``close``, and
    the ``done`` parameter of ``score`` (a scorer without it has its scores committed when ``score`` returns)."""

    tokenizer: Any
    identity: str  # changes whenever scores could change (weights, dtype)
    context_length: Optional[int]  # the most positions the model takes (None: unknown)
    loaded: Optional[bool]  # whether the weights are in memory (None: the scorer does not say)
    about: Mapping[str, Any]  # for reports: the model's name, revision, dtype, device

    def score(
        self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None, done: Optional[Done] = None
    ) -> list[Score]:
        """One score per item; ``progress(tokens)`` and ``done(indices, scores)`` as batches finish."""
        ...

    def load(self) -> None: ...

    def close(self) -> None: ...


def token_batches(
    items: Sequence[Rendered], batch_tokens: int, max_padding: float = 1.0, min_fill: float = 0.0
) -> Iterator[list[int]]:
    """Indices of ``items``, longest first, in batches whose padded size stays within ``batch_tokens``; a batch
    holding at least ``min_fill`` of ``batch_tokens`` is cut rather than let its padding pass ``max_padding``."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    batch: list[int] = []
    filled = 0
    for i in order:
        size = len(items[i].input_ids)
        width = len(items[batch[0]].input_ids) if batch else size
        padded = width * (len(batch) + 1)
        full_enough = width * len(batch) >= min_fill * batch_tokens
        if batch and (padded > batch_tokens or (full_enough and 1 - (filled + size) / padded > max_padding)):
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


class Pending:
    """A batch's results on their way to the host: per-row sums, and per-token log-probabilities and ranks when
    kept; ``event`` marks the end of their copy on a CUDA stream (None: they are on the host already)."""

    def __init__(self, sizes: list[int], sums: Any, lps: Any = None, ranks: Any = None, event: Any = None):
        self.sizes, self.sums, self.lps, self.ranks, self.event = sizes, sums, lps, ranks, event

    def scores(self) -> list[Score]:
        """The batch's scores, once its copy is done."""
        if self.event is not None:
            self.event.synchronize()
        if self.lps is None:
            return [Score(s, n) for s, n in zip(self.sums.tolist(), self.sizes)]
        per_token = zip(self.lps.split(self.sizes), self.ranks.split(self.sizes))
        return [Score.of(s, n, lp.numpy(), rk.numpy())
                for s, n, (lp, rk) in zip(self.sums.tolist(), self.sizes, per_token)]


class TransformersScorer:
    """Scores with a transformers causal LM, described by a ``models.ModelSpec`` and loaded on first use.

    ``pack`` runs each batch as one padding-free row whose position ids restart per sequence; it is the
    default with flash-attention (its varlen kernel keeps sequences apart without a dense mask), while SDPA
    and eager attention get length-sorted padded batches. ``share_prefixes`` runs an instruction's prompt once
    for all its candidates; by default it is on for CPUs and off for CUDA devices, where plain padded batches
    were measured faster (docs/scoring.md). ``token_scores`` keeps each response token's log-probability and rank
    in the scores; without it only sums and counts are computed and copied.
    """

    def __init__(
        self,
        spec: "ModelSpec",
        batch_tokens: int = 4096,
        pack: Optional[bool] = None,
        share_prefixes: Optional[bool] = None,
        max_padding: float = MAX_PADDING,
        token_scores: bool = True,
    ):
        self.spec, self.tokenizer, self.identity, self.context_length = spec, spec.tokenizer, spec.identity, spec.context_length
        self.batch_tokens = batch_tokens
        self.max_padding = max_padding
        self.pack_option = pack
        self.share_option = share_prefixes
        self.token_scores = token_scores
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
        """Load the weights (once), split the model into its body and its LM head, and settle what depends on the
        device: prefix sharing, the padding rule and the head's block of rows."""
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
        self.cuda = self.head.weight.device.type == "cuda"
        self.share = self.share_option if self.share_option is not None else not self.cuda
        self.min_fill = GPU_MIN_FILL if self.cuda else 0.0
        rows = HEAD_BLOCK_BYTES["cuda" if self.cuda else "cpu"] // (4 * self.head.weight.shape[0])
        # a row of the head's logits takes about what 8 tokens of the body take (an 8B model, 128k vocabulary): a
        # block of at most an eighth of the batch's tokens stays within the memory the batch tokens allow
        self.head_rows = max(1, min(rows, self.batch_tokens // 8))
        # transformers renamed ``past_key_values`` to ``cache``; the host frameworks pin releases on both sides
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"

    def score(
        self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None, done: Optional[Done] = None
    ) -> list[Score]:
        """Scores of ``items`` in one batching pass; each batch is handed to ``done`` (and counted in ``progress``)
        once the next one is running."""
        self.load()
        results: list[Optional[Score]] = [None] * len(items)

        def finish(indices: list[int], parts: list[Any]) -> None:
            scores = [s for part in parts for s in part.scores()]
            for i, s in zip(indices, scores):
                results[i] = s
            if done:
                done(indices, scores)
            if progress:
                progress(sum(len(items[i].input_ids) for i in indices))

        running: Optional[tuple[list[int], list[Any]]] = None
        jobs = shared_prefixes(items) if self.share else [(0, list(range(len(items))))]
        for shared, members in jobs:
            prefix = self._prefix_cache(items[members[0]].input_ids[:shared]) if shared else None
            tails = [Rendered(items[i].input_ids[shared:], 0, 0) for i in members]
            padding = 1.0 if self.pack and not shared else self.max_padding
            for batch in token_batches(tails, self.batch_tokens, padding, self.min_fill):
                indices = [members[b] for b in batch]
                launched = self._score_backing_off([items[i] for i in indices], shared, prefix)
                if running:
                    finish(*running)
                running = indices, launched
        if running:
            finish(*running)
        return results  # type: ignore[return-value]

    def _prefix_cache(self, prefix: Any) -> Any:
        """The key/value cache of a shared prefix, computed once."""
        import torch

        self.positions_run += len(prefix)
        with torch.inference_mode():
            ids = torch.as_tensor(prefix, dtype=torch.long, device=self.head.weight.device)[None]
            return self.body(input_ids=ids, use_cache=True).past_key_values

    def _score_backing_off(self, batch: list[Rendered], shared: int, prefix: Any) -> list[Any]:
        """Launch a batch (``Pending`` results); on out-of-memory, halve it and go on."""
        try:
            return [self._score_batch(batch, shared, prefix)]
        except RuntimeError as exc:
            if len(batch) == 1 or not is_oom(exc):
                raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return self._score_backing_off(batch[:half], shared, prefix) + self._score_backing_off(batch[half:], shared, prefix)

    def _to_device(self, tensor: Any) -> Any:
        """A host tensor on the model's device; from pinned memory without waiting, on CUDA."""
        if not self.cuda:
            return tensor
        return tensor.pin_memory().to(self.head.weight.device, non_blocking=True)

    def _score_batch(self, batch: list[Rendered], shared: int = 0, prefix: Any = None) -> Pending:
        """Run the body on ``batch`` (after a ``shared``-token prefix whose cache is ``prefix``), then the head."""
        import copy

        import numpy as np
        import torch

        tails = [r.input_ids[shared:] for r in batch]
        sizes = [r.n_tokens for r in batch]
        # position p predicts token p + 1: response tokens [start, end) are predicted at [start - 1, end - 1)
        rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(sizes))
        targets = torch.from_numpy(np.concatenate([r.input_ids[r.start : r.end] for r in batch]).astype(np.int64))
        if self.pack and prefix is None:
            flat = torch.from_numpy(np.concatenate(tails).astype(np.int64))[None]
            offsets = np.cumsum([0] + [len(t) for t in tails])
            at = torch.from_numpy(np.concatenate([np.arange(r.start - 1, r.end - 1) + offsets[b]
                                                  for b, r in enumerate(batch)]))
            # no cache: transformers only derives the per-sequence (block-diagonal) mask from position ids without one
            positions = torch.from_numpy(np.concatenate([np.arange(len(t)) for t in tails]))[None]
            inputs = {"input_ids": flat, "position_ids": positions, "use_cache": False}
            picks = torch.zeros_like(at), at
        else:
            width = max(len(t) for t in tails)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), shared + width), dtype=np.int64)
            mask[:, :shared] = 1
            for b, tail in enumerate(tails):
                ids[b, : len(tail)] = tail
                mask[b, shared : shared + len(tail)] = 1
            inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "use_cache": False}
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(batch))
                inputs.update({self.cache_kwarg: cache, "use_cache": True})
            at = torch.from_numpy(np.concatenate([np.arange(r.start - 1 - shared, r.end - 1 - shared) for r in batch]))
            picks = rows, at
        self.positions_run += inputs["input_ids"].numel()
        with torch.inference_mode():
            moved = {k: self._to_device(v) if torch.is_tensor(v) else v for k, v in inputs.items()}
            hidden = self.body(**moved).last_hidden_state
            picked = hidden[self._to_device(picks[0]), self._to_device(picks[1])]
            del hidden
            results = self._head(picked, self._to_device(targets), self._to_device(rows), len(batch))
        if not self.cuda:
            return Pending(sizes, *results)
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in results]
        for h, t in zip(host, results):
            if t is not None:
                h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(sizes, *host, event)

    def _head(self, picked: Any, targets: Any, rows: Any, n_rows: int) -> tuple[Any, Any, Any]:
        """The LM head on the picked positions, a block of rows at a time: per-row fp64 sums of the targets' fp32
        log-probabilities, and the per-token log-probabilities and int32 ranks when kept (else None)."""
        import torch

        sums = torch.zeros(n_rows, dtype=torch.float64, device=picked.device)
        keep = self.token_scores
        lps = torch.empty(len(targets), dtype=torch.float32, device=picked.device) if keep else None
        ranks = torch.empty(len(targets), dtype=torch.int32, device=picked.device) if keep else None
        for c in range(0, len(targets), self.head_rows):
            block = slice(c, c + self.head_rows)
            logits = self.head(picked[block]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            target = targets[block, None]
            if keep:
                # rank: vocabulary entries with a strictly higher logit than the actual token (0 = the top choice)
                ranks[block] = (logits > logits.gather(1, target)).sum(-1, dtype=torch.int32)
            # the fused log-softmax, not target - logsumexp: torch runs the latter as four passes over the block,
            # 1.5x the time of the log-softmax on a CPU (SmolLM2's head, 341 rows)
            lp = logits.log_softmax(-1).gather(1, target).squeeze(1)
            sums.index_add_(0, rows[block], lp.double())
            if keep:
                lps[block] = lp
        return sums, lps, ranks

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
    return configured(spec, cfg)


def configured(spec: "ModelSpec", cfg: GrapeConfig) -> TransformersScorer:
    """The transformers scorer over ``spec`` with a run's options: its token budget, and per-token values computed
    only when they are kept (``keep_token_scores``, which every metric that reads them requires)."""
    return TransformersScorer(spec, cfg.batch_tokens, token_scores=cfg.keep_token_scores)


@hookimpl
def grape_register_scorers(register: Callable[[str, Callable[[GrapeConfig], Scorer]], None]) -> None:
    register("transformers", transformers_scorer)
