"""Score rendered candidates: log-probabilities of the response tokens under the base model.

The transformers scorer runs the model body on length-sorted batches under a token budget, then applies the LM
head only at the positions that predict response tokens, in blocks of rows, so no ``[batch tokens x vocab]``
tensor is ever built. Each block's logits get an fp32 log-softmax; a response token's rank (how many vocabulary
entries score higher) comes from the same block, only when per-token values are kept. A batch's results stay on
the device until the batch is done and reach the host in one copy, while the next batch is already running.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Protocol, Sequence

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
SHARED_ROW_MAX = 4096  # positions of a row that holds a prefix once and its items' rests (its mask: rests x width)

Done = Callable[[Sequence[int], Sequence[Score]], None]  # indices of the items scored, and their scores
Row = tuple[int, list[int]]  # a shared prefix length and the items whose rests follow it in one row (0: one item alone)


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
    lengths: Sequence[int], batch_tokens: int, max_padding: float = 1.0, min_fill: float = 0.0
) -> Iterator[list[int]]:
    """Indices of ``lengths``, longest first, in batches whose padded size stays within ``batch_tokens``; a batch
    holding at least ``min_fill`` of ``batch_tokens`` is cut rather than let its padding pass ``max_padding``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    filled = 0
    for i in order:
        size = lengths[i]
        width = lengths[batch[0]] if batch else size
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


def prefix_rows(lengths: Sequence[int], shared: int, members: list[int], budget: int) -> list[Row]:
    """A job's items as rows, each the shared prefix once and then the rests of as many items as fit ``budget``
    positions (an item longer than that gets a row of its own)."""
    rows, row, width = [], [], shared
    for i in sorted(members, key=lambda i: -lengths[i]):
        if row and width + lengths[i] - shared > budget:
            rows.append((shared, row))
            row, width = [], shared
        row.append(i)
        width += lengths[i] - shared
    return rows + [(shared, row)]


def job_rows(lengths: Sequence[int], job: tuple[int, list[int]], budget: int, pair_cost: float) -> list[Row]:
    """A job's rows: shared when that saves at least ``SHARE_MIN_SAVED`` positions' worth of work, else each item
    alone. A row's work is its positions plus ``pair_cost`` per attention pair computed: an item's positions squared;
    for a shared row, its prefix squared and its rests against the whole row (a mask lets every rest skip the others,
    but the attention kernel still computes those pairs)."""
    shared, members = job
    alone = [(0, [i]) for i in members]
    if not shared:
        return alone
    together = prefix_rows(lengths, shared, members, budget)

    def work(rows: list[Row]) -> float:  # a shared row's prefix attends within itself, its rests to the whole row
        widths = ((r[0], row_width(r, lengths.__getitem__)) for r in rows)
        return sum(w + pair_cost * (p * p + (w - p) * w) for p, w in widths)

    return together if work(together) + SHARE_MIN_SAVED <= work(alone) else alone


def row_width(row: tuple[int, Sequence[Any]], length: Callable[[Any], int]) -> int:
    shared, members = row
    return shared + sum(length(m) - shared for m in members)


SHARED_ATTENTION = "grape_shared_prompts"  # SDPA, and shared rows in two passes (``shared_attention``)


def shared_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
                     ) -> tuple[Any, None]:  # fmt: skip
    """Transformers' SDPA attention; for a batch of shared rows (``grape_rests``, ``Rests``) in two passes instead of
    one over every pair of a row: the prefixes, causal and unmasked (the fused kernels skip what causality hides),
    then only the rests' queries against their row under ``attention_mask`` (rows x rests x width: the prefix and
    the rest itself)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grape_rests, scaling = kwargs.pop("grape_rests", None), kwargs.get("scaling")
    if grape_rests is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, prefix = torch.arange(query.shape[0], device=query.device)[:, None], grape_rests.prefix
    head, _ = sdpa_attention_forward(module, query[:, :, :prefix], key[:, :, :prefix], value[:, :, :prefix], None,
                                     scaling=scaling, is_causal=True)  # fmt: skip
    rests = query[rows, :, grape_rests.gather].transpose(1, 2)  # rows x heads x rests x head size
    tail, _ = sdpa_attention_forward(module, rests, key, value, attention_mask, scaling=scaling, is_causal=False)
    out = query.new_zeros(query.shape[0], query.shape[2] + 1, query.shape[1], query.shape[3])
    out[:, :prefix] = head
    out[rows, grape_rests.scatter] = tail  # padding goes to the extra last position
    return out[:, :-1], None


class Rests(NamedTuple):
    """Where a batch of shared rows keeps its rests: the longest prefix, and each row's rest positions padded with
    its last one (``gather``) or with a position past the row (``scatter``)."""

    prefix: int
    gather: Any
    scatter: Any


def rests_mask(part: Any, gather: Any) -> Any:
    """What each rest position (``gather``) of rows of parts (0: the shared prefix, k: the k-th rest, -1: padding)
    sees: the positions up to it in the prefix and in its own rest."""
    import torch

    query, key = part.gather(1, gather)[:, :, None], part[:, None, :]
    before = torch.arange(part.shape[1], device=part.device) <= gather[:, :, None]
    return (before & ((key == 0) | (key == query)))[:, None]


@contextmanager
def shared_attention_in(model: Any) -> Iterator[None]:
    """``model``'s attention runs through ``shared_attention`` (registered by the scorer's ``load``) inside the block
    (transformers looks the function up by the name in the model's config on every call; the batch's own 4D mask
    skips its mask making), and as it was again afterwards."""
    saved, model.config._attn_implementation = model.config._attn_implementation, SHARED_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = saved


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
    for all its candidates: a row holds the prompt and then every candidate's rest, each rest attending to the
    prompt and to itself at its own positions (``shared_attention``: SDPA, no sliding window). By default
    it is on for CPUs and off for CUDA devices until measured faster there (docs/scoring.md). ``token_scores``
    keeps each response token's log-probability and rank in the scores; without it only sums and counts are
    computed and copied.
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
        # shared rows run through SDPA (``shared_attention``), whose masks stand for a sliding window only if there
        # is none, in a model that hands its attention function the call's arguments (transformers' attention backend)
        layers = getattr(model.config, "layer_types", None)
        window = "sliding_attention" in layers if layers else getattr(model.config, "sliding_window", None)
        can_share = attn == "sdpa" and not window and getattr(model, "is_backend_compatible", lambda: False)()
        self.share = can_share and (self.share_option if self.share_option is not None else not self.cuda)
        if self.share:
            from transformers import AttentionInterface

            AttentionInterface.register(SHARED_ATTENTION, shared_attention)
        self.min_fill = GPU_MIN_FILL if self.cuda else 0.0
        # an attention pair (a query and a key: 4 FLOPs per layer and hidden unit) in positions (2 FLOPs a parameter)
        cfg, embedding = model.config, model.get_input_embeddings().weight.numel()
        weights = sum(p.numel() for p in self.body.parameters()) - embedding
        pair_flops = 4 * getattr(cfg, "num_hidden_layers", 0) * getattr(cfg, "hidden_size", 0)
        self.pair_cost = pair_flops / (2 * weights) if weights > 0 else 0.0
        rows = HEAD_BLOCK_BYTES["cuda" if self.cuda else "cpu"] // (4 * self.head.weight.shape[0])
        # a row of the head's logits takes about what 8 tokens of the body take (an 8B model, 128k vocabulary): a
        # block of at most an eighth of the batch's tokens stays within the memory the batch tokens allow
        self.head_rows = max(1, min(rows, self.batch_tokens // 8))

    def score(
        self, items: Sequence[Rendered], progress: Optional[Callable[[int], None]] = None, done: Optional[Done] = None
    ) -> list[Score]:
        """Scores of ``items`` in one batching pass over rows (an item alone, or a shared prompt and the rests of its
        candidates); each batch is handed to ``done`` (and counted in ``progress``) once the next one is running."""
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

        lengths = [len(item.input_ids) for item in items]
        jobs = shared_prefixes(items) if self.share else [(0, list(range(len(items))))]
        budget = min(self.batch_tokens, SHARED_ROW_MAX)
        rows = [row for job in jobs for row in job_rows(lengths, job, budget, self.pair_cost)]
        running: Optional[tuple[list[int], list[Any]]] = None
        for kind in (False, True):  # items alone, then shared rows: a batch of the first runs SDPA as it is
            these = [row for row in rows if (row[0] > 0) == kind]
            widths = [row_width(row, lengths.__getitem__) for row in these]
            padding = 1.0 if self.pack and not kind else self.max_padding
            for batch in token_batches(widths, self.batch_tokens, padding, self.min_fill):
                chosen = [these[b] for b in batch]
                launched = self._score_backing_off([(shared, [items[i] for i in m]) for shared, m in chosen])
                if running:
                    finish(*running)
                running = [i for _, m in chosen for i in m], launched
        if running:
            finish(*running)
        return results  # type: ignore[return-value]

    def _score_backing_off(self, rows: list[tuple[int, list[Rendered]]]) -> list[Any]:
        """Launch a batch of rows (``Pending`` results); on out-of-memory, halve it and go on."""
        try:
            return [self._score_batch(rows)]
        except RuntimeError as exc:
            if len(rows) == 1 or not is_oom(exc):
                raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        return self._score_backing_off(rows[:half]) + self._score_backing_off(rows[half:])

    def _to_device(self, tensor: Any) -> Any:
        """A host tensor on the model's device; from pinned memory without waiting, on CUDA."""
        if not self.cuda:
            return tensor
        return tensor.pin_memory().to(self.head.weight.device, non_blocking=True)

    def _score_batch(self, rows: list[tuple[int, list[Rendered]]]) -> Pending:
        """Run the body on a batch of rows, then the head on the positions that predict response tokens.

        A row is one item (shared length 0), or a shared prefix once and then the rest of each of its items: there
        each rest attends to the prefix and to itself, at the positions it would have alone."""
        import numpy as np
        import torch

        batch = [r for _, members in rows for r in members]
        sizes = [r.n_tokens for r in batch]
        # position p predicts token p + 1: response tokens [start, end) are predicted at [start - 1, end - 1)
        rows_of = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(sizes))
        targets = torch.from_numpy(np.concatenate([r.input_ids[r.start : r.end] for r in batch]).astype(np.int64))
        width = max(row_width(row, lambda r: len(r.input_ids)) for row in rows)
        ids, positions = np.zeros((len(rows), width), dtype=np.int64), np.zeros((len(rows), width), dtype=np.int64)
        part = np.full((len(rows), width), -1, dtype=np.int64)  # 0: the shared prefix, k: the k-th rest, -1: padding
        at_row, at = [], []
        for b, (shared, members) in enumerate(rows):
            ids[b, :shared], positions[b, :shared], part[b, :shared] = members[0].input_ids[:shared], range(shared), 0
            offset = shared
            for k, r in enumerate(members, 1):
                n = len(r.input_ids) - shared
                ids[b, offset : offset + n] = r.input_ids[shared:]
                positions[b, offset : offset + n], part[b, offset : offset + n] = np.arange(shared, shared + n), k
                at.append(np.arange(r.start - 1, r.end - 1) - shared + offset)
                at_row.append(np.full(r.n_tokens, b))
                offset += n
        at_row, at = np.concatenate(at_row), np.concatenate(at)
        alone = all(shared == 0 and len(m) == 1 for shared, m in rows)
        if self.pack and alone:
            # one padding-free row, position ids restarting per item; no cache: transformers only derives the
            # per-sequence (block-diagonal) mask from position ids without one
            real = part.reshape(-1) >= 0
            inputs = {"input_ids": ids.reshape(-1)[real][None], "position_ids": positions.reshape(-1)[real][None]}
            picks = np.zeros_like(at), np.flatnonzero(real).searchsorted(at_row * width + at)
        elif alone:
            inputs, picks = {"input_ids": ids, "attention_mask": (part >= 0).astype(np.int64)}, (at_row, at)
        else:  # the parts and the rests' positions go to the device, where they become the rests' mask
            in_rests = [np.flatnonzero(p > 0) for p in part]
            n = max(len(r) for r in in_rests)
            inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": part,
                      "gather": np.stack([np.pad(r, (0, n - len(r)), mode="edge") for r in in_rests]),
                      "scatter": np.stack([np.pad(r, (0, n - len(r)), constant_values=width) for r in in_rests])}  # fmt: skip
            picks = at_row, at
        self.positions_run += inputs["input_ids"].size
        with torch.inference_mode():
            moved = {k: self._to_device(torch.from_numpy(v)) for k, v in inputs.items()}
            if not alone:
                rests = Rests(max(shared for shared, _ in rows), moved.pop("gather"), moved.pop("scatter"))
                moved.update(attention_mask=rests_mask(moved["attention_mask"], rests.gather), grape_rests=rests)
            with nullcontext() if alone else shared_attention_in(self.model):
                hidden = self.body(**moved, use_cache=False).last_hidden_state
            picked = hidden[self._to_device(torch.from_numpy(picks[0])), self._to_device(torch.from_numpy(picks[1]))]
            del hidden
            results = self._head(picked, self._to_device(targets), self._to_device(rows_of), len(batch))
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
