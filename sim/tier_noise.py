"""A tier predictor of chosen quality for simulated requests without prompt text (Azure,
Mooncake, BurstGPT): each request gets a hidden label, whether the small tier's answer
suffices, and a `p_small_ok` that ranks those labels with a target ROC AUC, so load-aware
tier routing can be studied at any predictor quality (as `sim.rank_noise` does for the
output-length ranker's Kendall tau).

The binormal model (equal variances), per request id:

    small_ok ~ Bernoulli(small_ok_share)
    z        = d x small_ok + e,   e ~ N(0, 1),   d = sqrt(2) x Phi^-1(auc)

so that P(z of an ok request > z of a not-ok one) = Phi(d / sqrt(2)) = auc exactly. Both
draws come from a hash of (seed, request id), so one request gets the same label and score
in every policy of a comparison. auc 0.5 is a predictor that knows nothing (d = 0), 1 the
oracle.

The score is z's percentile under the mixture, mapped through the tier model's held-out
table (`ThresholdPoint`: threshold -> share of large calls) so that a threshold sends the
same share of requests large as it does on the held-out prompts: a tenant's cost budget
means the same at every auc, and only which requests go small changes. Without a table the
score is the percentile itself (uniform in (0, 1)).

Quality of a run, in the units of the labels: a request answered by the large tier, or by
the small tier where its label says small suffices, scores 1; 0 otherwise (`quality`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from scheduler.tiers import ThresholdPoint

_UNIT = NormalDist()
_ORACLE_SEPARATION = 12.0  # auc 1: Phi(12 / sqrt 2) = 1 - 1e-17


def _uniform(seed: int, salt: str, request_id: str) -> float:
    digest = hashlib.blake2b(f"tier-{salt}:{seed}:{request_id}".encode(), digest_size=8).digest()
    value: int = struct.unpack("<Q", digest)[0]
    return (value + 0.5) / 2**64


def _parse_unit(text: str, what: str, open_low: bool) -> float:
    import argparse

    interval = "(0, 1]" if open_low else "[0, 1]"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}") from None
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}")
    return value


def parse_auc(text: str) -> float:
    """argparse type of `--tier-auc`: a ROC AUC in (0, 1]."""
    return _parse_unit(text, "a ROC AUC", open_low=True)


def parse_share(text: str) -> float:
    """argparse type of `--tier-small-ok-share`: a share in [0, 1]."""
    return _parse_unit(text, "a share", open_low=False)


@dataclass(frozen=True, slots=True)
class TierNoise:
    """The knobs: the predictor's ROC AUC on the small_ok labels, and the share of requests
    whose small answer suffices (None: the tier model's training share, `small_ok_share`
    in its `trained` metadata, else 0.5)."""

    auc: float = 0.5
    small_ok_share: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.auc <= 1.0:
            raise ValueError(f"tier noise: auc: expected a number in (0, 1], got {self.auc}")
        if self.small_ok_share is not None and not 0.0 <= self.small_ok_share <= 1.0:
            raise ValueError(f"tier noise: small_ok_share: expected a number in [0, 1], got {self.small_ok_share}")

    @property
    def separation(self) -> float:
        """d of the binormal model."""
        if self.auc >= 1.0:
            return _ORACLE_SEPARATION
        return math.sqrt(2.0) * _UNIT.inv_cdf(self.auc)


@dataclass(frozen=True, slots=True)
class NoisyTierScores:
    """Labels and scores of one simulation (a `TierNoise`, its seed, the held-out table)."""

    noise: TierNoise
    seed: int = 0
    table: tuple[ThresholdPoint, ...] = ()
    default_share: float = 0.5

    @property
    def share(self) -> float:
        return self.noise.small_ok_share if self.noise.small_ok_share is not None else self.default_share

    def small_ok(self, request_id: str) -> bool:
        return _uniform(self.seed, "label", request_id) < self.share

    def score(self, request_id: str) -> float:
        """p_small_ok of the request (see the module docstring)."""
        d = self.noise.separation
        z = d * self.small_ok(request_id) + _UNIT.inv_cdf(_uniform(self.seed, "noise", request_id))
        s = self.share
        percentile = s * _UNIT.cdf(z - d) + (1.0 - s) * _UNIT.cdf(z)
        return _through_table(percentile, self.table)


def _through_table(percentile: float, table: Sequence[ThresholdPoint]) -> float:
    """The threshold below which `percentile` of held-out requests fall (linear between
    rows); the percentile itself without a table."""
    rows = sorted(table, key=lambda r: (r.large_share, r.threshold))
    if len(rows) < 2:
        return min(1.0, max(0.0, percentile))
    shares = [r.large_share for r in rows]
    k = bisect_left(shares, percentile)
    if k <= 0:
        value = rows[0].threshold
    elif k >= len(rows):
        value = rows[-1].threshold
    else:
        lo, hi = rows[k - 1], rows[k]
        span = hi.large_share - lo.large_share
        frac = 0.0 if span <= 0 else (percentile - lo.large_share) / span
        value = lo.threshold + frac * (hi.threshold - lo.threshold)
    return min(1.0, max(0.0, value))


def quality(served_model: Mapping[str, str], scores: NoisyTierScores, small_model: str) -> float:
    """Mean quality of a run (module docstring): 1 unless small answered a not-ok request."""
    if not served_model:
        return float("nan")
    lost = sum(1 for rid, model in served_model.items() if model == small_model and not scores.small_ok(rid))
    return 1.0 - lost / len(served_model)
