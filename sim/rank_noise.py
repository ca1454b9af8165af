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

import hashlib
import itertools
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from sim.workload import TraceRequest

RankFn = Callable[[TraceRequest], float | None]
_UNIT = NormalDist()
_TAU_SAMPLE = 4000


def _standard_normal(seed: int, request_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    u = (struct.unpack("<Q", digest)[0] + 0.5) / 2**64  # in (0, 1)
    return _UNIT.inv_cdf(u)


def noisy_ranks(output_tokens: Sequence[int], noise_sd: float, seed: int, ids: Sequence[str]) -> np.ndarray:
    truth = np.log1p(np.asarray(output_tokens, dtype=np.float64))
    noise = np.array([_standard_normal(seed, i) for i in ids])
    return truth + noise_sd * noise


def measured_tau(output_tokens: Sequence[int], noise_sd: float, seed: int = 0) -> float:
    from scipy.stats import kendalltau

    ids = [str(i) for i in range(len(output_tokens))]
    tau = kendalltau(noisy_ranks(output_tokens, noise_sd, seed, ids), output_tokens).statistic
    return float(tau)


def noise_sd_for_tau(output_tokens: Sequence[int], target_tau: float, seed: int = 0) -> float:
    """The noise that gives Kendall tau `target_tau` on these output lengths (a sample of
    at most 4,000 of them); 0 for tau >= the noiseless tau (ties in the truth cap it)."""
    if not -1.0 < target_tau <= 1.0:
        raise ValueError(f"target tau: expected a number in (-1, 1], got {target_tau}")
    sample = list(output_tokens)
    if len(sample) > _TAU_SAMPLE:
        picks = np.random.default_rng(seed).choice(len(sample), _TAU_SAMPLE, replace=False)
        sample = [sample[int(i)] for i in picks]
    if len(sample) < 10:
        raise ValueError(f"target tau: need at least 10 output lengths to calibrate, got {len(sample)}")
    if target_tau >= measured_tau(sample, 0.0, seed) - 1e-9:
        return 0.0
    low, high = 0.0, 1.0
    while measured_tau(sample, high, seed) > target_tau and high < 1e4:
        high *= 2.0
    for _ in range(40):
        mid = (low + high) / 2.0
        if measured_tau(sample, mid, seed) > target_tau:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


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
