"""Fit metrics: how well a candidate fits the model, computed from the values one scoring pass keeps (the sum and
count of response-token log-probabilities, and each token's log-probability and rank). Higher = fits better;
selection keeps the candidates with the highest fit, so changing the metric re-selects without running a model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from .config import GrapeConfig
from .errors import GrapeError
from .hookspecs import hookimpl
from .records import Score


@dataclass(frozen=True)
class Metric:
    """``fit(score, cfg)``: a float, higher for a better fit. ``needs`` names the per-token arrays of ``Score`` it
    reads (``logprobs``, ``ranks``); the definition and the paper belong in ``fit``'s docstring."""

    fit: Callable[[Score, GrapeConfig], float]
    needs: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fit) or ""


def mean(score: Score, cfg: GrapeConfig) -> float:
    """Mean log-probability of the response tokens (GRAPE: Zhang, Dai, Peng, "The Best Instruction Tuning Data Are
    Those That Fit", arXiv 2502.04194). The exact fp64 sum over the token count."""
    return score.mean


def total(score: Score, cfg: GrapeConfig) -> float:
    """Sum of the response tokens' log-probabilities: the log-probability of the whole response (favours short
    responses; the usual unnormalised control)."""
    return score.logprob_sum


def min_k(score: Score, cfg: GrapeConfig) -> float:
    """Min-K% Prob (Shi et al., "Detecting Pretraining Data from Large Language Models", arXiv 2310.16789): the
    mean of the lowest ``min_k_fraction`` of the response tokens' log-probabilities (``max(1, floor(k * n))``
    tokens), so a response is judged by its least likely tokens."""
    import numpy as np

    lps = np.sort(score.logprobs.astype(np.float64))
    return float(lps[: max(1, int(cfg.min_k_fraction * score.n_tokens))].mean())


def drop_first(score: Score, cfg: GrapeConfig) -> float:
    """ASLEC-DROP (Wang et al., "On the Step Length Confounding in LLM Reasoning Data Selection", arXiv
    2604.06834): the mean log-probability without the low-probability first token, whose weight in the plain mean
    shrinks as the response grows. The whole response is one step here (the paper drops the first token of every
    reasoning step); a one-token response keeps its token."""
    if score.n_tokens == 1:
        return score.mean
    return (score.logprob_sum - float(score.logprobs[0])) / (score.n_tokens - 1)


def rsr(score: Score, cfg: GrapeConfig) -> float:
    """Rank-Surprisal Ratio (Yang et al., "Which Reasoning Trajectories Teach Students to Reason Better? A Simple
    Metric of Informative Alignment", arXiv 2601.14249), negated so that higher fits better:
    ``-sum_t min(rank_t, r) / sum_t -log p_t`` with 1-based ranks (1 + the vocabulary entries with a strictly higher
    logit) clipped at ``rsr_rank_clip`` (r, 100 as in the authors' code) and the total surprisal (negative
    log-likelihood) of the response. Lower RSR (informative but well-ranked tokens) is better in the paper."""
    import numpy as np

    ranks = np.minimum(score.ranks.astype(np.int64) + 1, cfg.rsr_rank_clip)
    return -float(ranks.sum()) / max(-score.logprob_sum, 1e-12)


def fit_function(metric: Metric, name: str, cfg: GrapeConfig) -> Callable[[Score], float]:
    """``metric`` (registered as ``name``) as a function of a score, refusing scores that lack what it needs with a
    clear error."""

    def fit(score: Score) -> float:
        missing = [n for n in metric.needs if getattr(score, n) is None]
        if missing:
            raise GrapeError(
                f"metric '{name}' needs per-token {' and '.join(missing)}, which these scores lack "
                "(the vllm scorer computes no ranks; keep_token_scores: false keeps neither)"
            )
        return float(metric.fit(score, cfg))

    return fit


@hookimpl
def grape_register_metrics(register: Callable[[str, Any], None]) -> None:
    register("mean", Metric(mean))
    register("sum", Metric(total))
    register("min_k", Metric(min_k, ("logprobs",)))
    register("drop_first", Metric(drop_first, ("logprobs",)))
    register("rsr", Metric(rsr, ("ranks",)))
