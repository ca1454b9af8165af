"""Tier routing in the simulator (`tokenyard sim run`, `simulate`): the `TierRouter` built
from the cluster file's policy document (`tiers:`), and a `p_small_ok` for every request
that names the alias.

Scores, in order:
1. the trace's own `p_small_ok` field, when the row has one;
2. the tier predictor's score of the row's `prompt`, when it has prompt text;
3. otherwise the noise model of `sim.tier_noise`: a hidden small_ok label and a score
   that ranks it with a chosen ROC AUC (`tokenyard sim run --tier-auc`, default 0.5: a
   predictor that knows nothing about a prompt it never saw), drawn from a hash of (seed,
   request id), so one request gets the same score in every policy of a comparison. The
   scores follow the tier model's held-out table, so a threshold sends the same share of
   requests large as on held-out prompts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from scheduler.tiers import TierRouter, build_tier_router
from sim.tier_noise import NoisyTierScores, TierNoise
from sim.workload import TraceRequest


@functools.lru_cache(maxsize=8)
def _predictor(model_file: str | None) -> Any:
    from scheduler.predictors.tier import load_predictor

    return load_predictor(model_file)


def tier_router_for(document: Any) -> tuple[TierRouter, Any] | None:
    """(router, predictor) from a policy document's `tiers:` section; None without one.
    Reads the tier model file (the section's `model_file`, else the packaged model) once
    per process."""
    if document is None or document.tiers is None:
        return None
    predictor = _predictor(document.tiers.model_file)
    router = build_tier_router(document.tiers.to_section(with_model_file=False), predictor.thresholds, "tiers")
    return router, predictor


@dataclass(frozen=True, slots=True)
class TierScorer:
    """p_small_ok of a request that carries none (steps 2 and 3 of the module docstring);
    `predictor` None: prompts are not read either (the noise model scores every request)."""

    predictor: Any
    noisy: NoisyTierScores

    def __call__(self, req: TraceRequest) -> float:
        if req.prompt and self.predictor is not None:
            return float(self.predictor.score(req.prompt))
        return self.noisy.score(req.request_id)


def tier_scorer(router: TierRouter, predictor: Any, noise: TierNoise | None, seed: int) -> TierScorer:
    """The scorer of one simulation: `noise` (default `TierNoise()`) over the router's
    held-out table; its small_ok share defaults to the predictor's training share."""
    meta = getattr(predictor, "meta", None) or {}
    share = meta.get("small_ok_share")
    default_share = float(share) if isinstance(share, int | float) and 0.0 <= share <= 1.0 else 0.5
    return TierScorer(predictor, NoisyTierScores(noise or TierNoise(), seed, tuple(router.table), default_share))
