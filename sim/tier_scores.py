"""Tier routing in the simulator (`tokenyard sim run`, `simulate`): the `TierRouter` built
from the cluster file's policy document (`tiers:`), and a `p_small_ok` for every request
that names the alias.

Scores, in order:
1. the trace's own `p_small_ok` field, when the row has one;
2. the tier predictor's score of the row's `prompt`, when it has prompt text;
3. otherwise a noise model: p_small_ok ~ Uniform(0, 1), drawn from a hash of (seed,
   request id), so one request gets the same score in every policy of a comparison.
   Uniform is what a calibrated predictor's score looks like on a trace whose prompts
   are unknown (no prior that a request is easy or hard); the share sent small then
   follows the threshold as `1 - threshold`.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from scheduler.tiers import TierRouter, build_tier_router
from sim.workload import TraceRequest


def uniform_score(seed: int, request_id: str) -> float:
    """A score in (0, 1), the same for the same (seed, request id)."""
    digest = hashlib.blake2b(f"tier:{seed}:{request_id}".encode(), digest_size=8).digest()
    value: int = struct.unpack("<Q", digest)[0]
    return (value + 0.5) / 2**64


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
    """p_small_ok of a request that carries none (steps 2 and 3 of the module docstring)."""

    predictor: Any
    seed: int = 0

    def __call__(self, req: TraceRequest) -> float:
        if req.prompt:
            return float(self.predictor.score(req.prompt))
        return uniform_score(self.seed, req.request_id)
