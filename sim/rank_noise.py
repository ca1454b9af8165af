"""Predicted output-length ranks for simulated requests (`RequestInfo.predicted_rank`).

A trace with prompt text gets the real ranker's score (`scheduler.predictors.rank`). A trace
without (Azure, Mooncake, BurstGPT) gets a noise model of a predictor of chosen quality:

    predicted_rank = ln(1 + true output tokens) + noise_sd x e,   e ~ N(0, 1)

`e` is drawn from a hash of (seed, request id), so one request gets the same prediction in
every policy of a comparison. Kendall's tau between the prediction and the truth falls as
`noise_sd` grows; `noise_sd_for_tau` finds, by bisection on a sample of the trace's own
output lengths, the noise that reproduces a target tau (e.g. the held-out tau that
`tokenyard train rank` reports), so the benefit of ranking can be studied at any predictor
quality. tau = 1 is the oracle (true-length SJF): `noise_sd = 0`. The scale is the real
ranker's (ln tokens), so the same queue-policy parameters apply to both.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

# The noise model is the planner's as well (its routing keys, the live control loop's);
# kept there, re-exported here for the simulator's callers.
from scheduler.planner.predicted import TAU_SAMPLE as _TAU_SAMPLE
from scheduler.planner.predicted import measured_tau as measured_tau
from scheduler.planner.predicted import noise_sd_for_tau as noise_sd_for_tau
from scheduler.planner.predicted import noisy_ranks as noisy_ranks
from scheduler.planner.predicted import standard_normal as _standard_normal
from sim.workload import TraceRequest

RankFn = Callable[[TraceRequest], float | None]


class NoisyRanker:
    """predicted_rank = ln(1 + true output) + noise_sd x N(0, 1), per request id."""

    def __init__(self, noise_sd: float, seed: int = 0) -> None:
        if not noise_sd >= 0 or not math.isfinite(noise_sd):
            raise ValueError(f"noise_sd: expected a finite number >= 0, got {noise_sd}")
        self.noise_sd = noise_sd
        self.seed = seed

    def __call__(self, trace: TraceRequest) -> float:
        rank = math.log1p(max(0, trace.output_tokens))
        if self.noise_sd == 0:
            return rank
        return rank + self.noise_sd * _standard_normal(self.seed, trace.request_id)


class InputLengthRanker:
    """The no-model baseline as a rank: ln(1 + prompt tokens)."""

    def __call__(self, trace: TraceRequest) -> float:
        return math.log1p(max(0, trace.input_tokens))


class ModelRanker:
    """The real ranker for requests with prompt text (loaded on the first one; None = the
    shipped default); `fallback` for the others."""

    def __init__(self, model: Any = None, fallback: RankFn | None = None) -> None:
        self.model = model
        self.fallback = fallback

    def __call__(self, trace: TraceRequest) -> float | None:
        if trace.prompt:
            if self.model is None:
                from scheduler.predictors.rank import load_rank_model

                self.model = load_rank_model()
            record = {"prompt": trace.prompt, "model": trace.model or "", "input_tokens": trace.input_tokens}
            return float(self.model.score(record))
        return self.fallback(trace) if self.fallback else None


RANKED_QUEUE_POLICIES = frozenset({"learned_rank"})


def parse_tau(text: str) -> float:
    """argparse type of --rank-tau: a Kendall tau in (-1, 1]."""
    import argparse

    try:
        tau = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Kendall tau in (-1, 1], got {text!r}") from None
    if not -1.0 < tau <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a Kendall tau in (-1, 1], got {text!r}")
    return tau


def queue_policy_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return str(next(iter(spec))) if spec else "fcfs"


def ranker_for(
    queue_policy: Any, open_trace: Callable[[], Iterable[TraceRequest]], rank_tau: float | None, seed: int = 0
) -> RankFn | None:
    """What `tokenyard sim` gives a run: the real ranker for requests with prompts and, with
    `rank_tau`, the noise model calibrated on the trace's first 4,000 requests for the rest.
    None when nothing reads ranks (no `rank_tau` and a queue policy that ignores them)."""
    if rank_tau is None and queue_policy_name(queue_policy) not in RANKED_QUEUE_POLICIES:
        return None
    fallback: RankFn | None = None
    if rank_tau is not None:
        sample = [r.output_tokens for r in itertools.islice(open_trace(), _TAU_SAMPLE)]
        fallback = NoisyRanker(noise_sd_for_tau(sample, rank_tau, seed), seed)
    return ModelRanker(None, fallback)
