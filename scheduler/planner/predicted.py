"""Planning on predicted output lengths: the predictor's noise model and the routing keys
it gives, for the offline planner (`tokenyard plan --route-by predicted`,
sim/plan_workload.py) and the live control loop (router/controlplane.py) alike.

A predictor of output length (the router's ranker, `RequestInfo.predicted_rank` =
predicted ln(1 + tokens)) is modelled as normal noise on the truth:

    predicted_rank = ln(1 + true output tokens) + noise_sd x e,   e ~ N(0, 1)

`noise_sd_for_tau` finds the noise that gives a measured Kendall tau (what `tokenyard
train rank` reports) on a sample of output lengths; `routing_keys` turns it into the
fraction of each bucket's requests predicted into each output column (`RoutingKey`),
which the solver sizes pools for. The simulator draws its predictions from the same
model (sim.rank_noise, `standard_normal` per request id).

Offline, each bucket's sample of lengths comes from the trace. Live, the routers'
histogram keeps counts only, so a cell's lengths are spread evenly on the ranker's
ln(1 + tokens) scale across the cell (`cell_output_lengths`; `grid_routing_keys`,
`grid_noise_sd`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from scheduler.planner.problem import Bucket, PlanError, RoutingKey

_UNIT = NormalDist()
TAU_SAMPLE = 4000
CELL_POINTS = 8  # representative lengths per live histogram cell
_GRID_TAU_SAMPLE = 1000  # lengths the live tau calibration runs on (it runs at every re-solve)


def standard_normal(seed: int, request_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    u = (struct.unpack("<Q", digest)[0] + 0.5) / 2**64  # in (0, 1)
    return _UNIT.inv_cdf(u)


def noisy_ranks(output_tokens: Sequence[int], noise_sd: float, seed: int, ids: Sequence[str]) -> np.ndarray:
    truth = np.log1p(np.asarray(output_tokens, dtype=np.float64))
    noise = np.array([standard_normal(seed, i) for i in ids])
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
    if len(sample) > TAU_SAMPLE:
        picks = np.random.default_rng(seed).choice(len(sample), TAU_SAMPLE, replace=False)
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


# A key member carrying less than this share of the key's traffic is left out of the key
# (so that a pool is not barred from a key by a sliver of an unservable bucket): the
# attainment target's slack covers it, and verification checks the plan with it.
_MIN_MEMBER_SHARE = 0.005


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def routing_keys(buckets: Sequence[Bucket], shapes: Sequence[Sequence[tuple[int, int]]],
                 output_edges: Sequence[int], noise_sd: float) -> tuple[RoutingKey, ...]:
    """Keys (class, input row, predicted output column) with the fraction of each bucket's
    requests a predictor of `noise_sd` (on ln(1 + tokens)) sends there, over the bucket's
    own sample of lengths (the cut points are the ln(1 + edge) of the routing table's
    lookup; the first and last columns are open-ended, as `bucket_of` clamps)."""
    if not noise_sd >= 0 or not math.isfinite(noise_sd):
        raise PlanError(f"rank noise: expected a finite standard deviation >= 0, got {noise_sd}")
    cuts = [math.log1p(e - 0.5) for e in output_edges[1:-1]]  # rounding: tokens >= e from e - 0.5
    groups: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for k, (bucket, sample) in enumerate(zip(buckets, shapes, strict=True)):
        if bucket.rate_rps <= 0 or not sample:
            continue
        mass = [0.0] * (len(cuts) + 1)
        for _, n_out in sample:
            true = math.log1p(max(0, n_out))
            below = [(_normal_cdf((c - true) / noise_sd) if noise_sd > 0 else float(true < c)) for c in cuts]
            for col in range(len(mass)):
                hi = below[col] if col < len(cuts) else 1.0
                lo = below[col - 1] if col > 0 else 0.0
                mass[col] += max(0.0, hi - lo) / len(sample)
        for col, fraction in enumerate(mass):
            if fraction > 1e-6:  # a tail the normal CDF never quite reaches
                groups.setdefault((bucket.slo_class, bucket.row, col), []).append((k, fraction))
    keys = []
    for (klass, row, col), members in sorted(groups.items()):
        total = sum(buckets[k].rate_rps * f for k, f in members)
        kept = tuple((k, f) for k, f in members if buckets[k].rate_rps * f >= _MIN_MEMBER_SHARE * total)
        keys.append(RoutingKey(klass, row, col, kept))
    return tuple(keys)


def cell_output_lengths(output_lo: int, output_hi: int, points: int = CELL_POINTS) -> tuple[int, ...]:
    """Representative output lengths of a histogram cell [output_lo, output_hi) that holds
    counts only: the midpoints of `points` equal steps of ln(1 + tokens), the ranker's scale."""
    lo, hi = math.log1p(max(0, output_lo)), math.log1p(max(output_lo, output_hi - 1))
    return tuple(round(math.expm1(lo + (hi - lo) * (k + 0.5) / points)) for k in range(points))


def grid_routing_keys(buckets: Sequence[Bucket], output_edges: Sequence[int],
                      noise_sd: float) -> tuple[RoutingKey, ...]:
    """`routing_keys` of a rate grid whose cells hold counts only (the live histogram)."""
    shapes = [[(b.input_lo, n) for n in cell_output_lengths(b.output_lo, b.output_hi)] for b in buckets]
    return routing_keys(buckets, shapes, output_edges, noise_sd)


def grid_noise_sd(buckets: Sequence[Bucket], tau: float) -> float:
    """The noise that gives Kendall tau `tau` on the grid's lengths, each cell's
    representative lengths weighted by its rate."""
    if not 0 < tau <= 1:
        raise PlanError(f"rank tau: expected a Kendall tau in (0, 1], got {tau}")
    total = sum(b.rate_rps for b in buckets if b.rate_rps > 0)
    if total <= 0:
        raise PlanError("rank tau: no traffic to calibrate the prediction noise on")
    if tau == 1:
        return 0.0
    lengths: list[int] = []
    for bucket in buckets:
        if bucket.rate_rps > 0:
            copies = max(2, round(_GRID_TAU_SAMPLE * bucket.rate_rps / total / CELL_POINTS))
            lengths.extend(cell_output_lengths(bucket.output_lo, bucket.output_hi) * copies)
    return noise_sd_for_tau(lengths, tau)
