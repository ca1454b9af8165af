"""Router quality metrics on the cost-quality plane (pure numpy): RouteLLM's PGR, APGR and
CPT(x%), RouterBench's AIQ, and a calibration table.

A router here sends the requests with the lowest p_small_ok to the large tier first; at a
share c of large calls its quality is the mean over prompts of the large tier's score on
those and the small tier's on the rest. PGR(c) = (q(c) - q_small) / (q_large - q_small);
a random router has PGR(c) = c in expectation, hence APGR 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapezoid needs numpy 2; the project allows 1.26)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


@dataclass(frozen=True, slots=True)
class RoutingCurve:
    """Quality and PGR at every share of large calls 0, 1/n, ..., 1 (n + 1 points)."""

    large_share: np.ndarray
    quality: np.ndarray
    pgr: np.ndarray
    q_small: float
    q_large: float


def routing_curve(p_small_ok: Sequence[float] | np.ndarray, q_small: Sequence[float] | np.ndarray,
                  q_large: Sequence[float] | np.ndarray, seed: int = 0) -> RoutingCurve:
    """The curve of a router that sends prompts to the large tier in ascending p_small_ok
    (ties broken by a seeded shuffle, so a constant score is a random router)."""
    p = np.asarray(p_small_ok, dtype=np.float64)
    qs = np.asarray(q_small, dtype=np.float64)
    ql = np.asarray(q_large, dtype=np.float64)
    n = len(p)
    if n == 0 or len(qs) != n or len(ql) != n:
        raise ValueError(f"routing_curve: expected equal non-empty lengths, got {n}, {len(qs)}, {len(ql)}")
    shuffle = np.random.default_rng(seed).permutation(n)
    order = shuffle[np.argsort(p[shuffle], kind="stable")]
    gain = np.concatenate([[0.0], np.cumsum((ql - qs)[order])])
    quality = (qs.sum() + gain) / n
    mean_small, mean_large = float(qs.mean()), float(ql.mean())
    gap = mean_large - mean_small
    pgr = (quality - mean_small) / gap if abs(gap) > 1e-12 else np.ones(n + 1)
    return RoutingCurve(np.arange(n + 1) / n, quality, pgr, mean_small, mean_large)


def apgr(curve: RoutingCurve) -> float:
    """Area under PGR against the share of large calls (RouteLLM's APGR)."""
    return _area(curve.pgr, curve.large_share)


def cpt(curve: RoutingCurve, pgr_target: float) -> float:
    """The least share of large calls at which PGR reaches `pgr_target` (RouteLLM's CPT)."""
    reached = np.nonzero(curve.pgr >= pgr_target - 1e-12)[0]
    return float(curve.large_share[reached[0]]) if len(reached) else 1.0


def aiq(curve: RoutingCurve) -> float:
    """RouterBench's AIQ: area under the non-decreasing upper convex hull of the
    (normalised cost, quality) points, cost normalised to [0, 1] (per-call prices make the
    cost linear in the share of large calls, so the share is the normalised cost)."""
    xs, ys = curve.large_share, np.maximum.accumulate(curve.quality)
    hull: list[tuple[float, float]] = []
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # hull[-1] under the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    hx = np.array([h[0] for h in hull])
    hy = np.array([h[1] for h in hull])
    return _area(hy, hx)


def summary(p_small_ok: Sequence[float] | np.ndarray, q_small: Sequence[float] | np.ndarray,
            q_large: Sequence[float] | np.ndarray, seed: int = 0) -> dict[str, float]:
    """APGR, CPT(50%), CPT(80%), AIQ of the router and of the random router (mean of 20 seeds)."""
    curve = routing_curve(p_small_ok, q_small, q_large, seed)
    n = len(curve.pgr) - 1
    random_apgr = [apgr(routing_curve(np.zeros(n), q_small, q_large, seed + k)) for k in range(20)]
    random_aiq = [aiq(routing_curve(np.zeros(n), q_small, q_large, seed + k)) for k in range(20)]
    return {
        "n": float(n),
        "q_small": curve.q_small,
        "q_large": curve.q_large,
        "apgr": apgr(curve),
        "cpt50": cpt(curve, 0.5),
        "cpt80": cpt(curve, 0.8),
        "aiq": aiq(curve),
        "random_apgr": float(np.mean(random_apgr)),
        "random_aiq": float(np.mean(random_aiq)),
    }


def calibration_table(p: Sequence[float] | np.ndarray, label: Sequence[float] | np.ndarray,
                      bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean predicted, observed rate and count per equal-width bin, and the expected
    calibration error (count-weighted |predicted - observed|)."""
    pa = np.asarray(p, dtype=np.float64)
    la = np.asarray(label, dtype=np.float64)
    index = np.minimum((pa * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    predicted = np.bincount(index, weights=pa, minlength=bins) / safe
    observed = np.bincount(index, weights=la, minlength=bins) / safe
    ece = float(np.sum(counts * np.abs(predicted - observed)) / max(1.0, counts.sum()))
    return predicted, observed, counts, ece
