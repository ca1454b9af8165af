"""Load-spreading pickers and scorers that need no affinity state: round-robin, random,
power-of-two choices, least KV usage."""

from __future__ import annotations

from bisect import bisect_right

from scheduler.dispatch_parts import (
    DispatchContext,
    Picker,
    Scorer,
    register_picker,
    register_scorer,
)
from scheduler.types import InstanceState, RequestInfo


def by_score(scored: list[tuple[InstanceState, float]]) -> list[InstanceState]:
    """Highest score first, ties by instance id (the max_score order)."""
    return [inst for inst, _ in sorted(scored, key=lambda pair: (-pair[1], pair[0].instance_id))]


@register_picker("round_robin")
class RoundRobin(Picker):
    """Each request goes to the instance after the last one chosen, in instance-id order.

    The position is the last chosen id, not a counter, so it stays fair when instances
    join, leave or are filtered out. Scores are ignored.
    """

    reads_progress = False

    def __init__(self) -> None:
        self._last_id: str | None = None

    def order(
        self, request: RequestInfo, scored: list[tuple[InstanceState, float]], ctx: DispatchContext
    ) -> list[InstanceState]:
        ring = sorted((inst for inst, _ in scored), key=lambda inst: inst.instance_id)
        if self._last_id is None:
            return ring
        start = bisect_right([inst.instance_id for inst in ring], self._last_id) % len(ring)
        return ring[start:] + ring[:start]

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        self._last_id = instance_id


@register_picker("random")
class UniformRandom(Picker):
    """A uniformly random order (from the policy's seeded RNG). Scores are ignored."""

    reads_progress = False

    def order(
        self, request: RequestInfo, scored: list[tuple[InstanceState, float]], ctx: DispatchContext
    ) -> list[InstanceState]:
        shuffled = sorted((inst for inst, _ in scored), key=lambda inst: inst.instance_id)
        ctx.rng.shuffle(shuffled)
        return shuffled


@register_picker("power_of_two")
class PowerOfTwoChoices(Picker):
    """Two distinct random candidates; the one with the better score wins (ties: lower id).

    Fallbacks: the other one, then the rest by score. With a load scorer this gives most of
    least-load's balance while sampling only two instances' (possibly stale) load.
    """

    reads_progress = False

    def order(
        self, request: RequestInfo, scored: list[tuple[InstanceState, float]], ctx: DispatchContext
    ) -> list[InstanceState]:
        if len(scored) <= 2:
            return by_score(scored)
        ranked = sorted(scored, key=lambda pair: pair[0].instance_id)
        i, j = ctx.rng.sample(range(len(ranked)), 2)
        pair = sorted((ranked[i], ranked[j]), key=lambda p: (-p[1], p[0].instance_id))
        chosen = [pair[0][0], pair[1][0]]
        rest = [p for k, p in enumerate(ranked) if k != i and k != j]
        return chosen + by_score(rest)


@register_scorer("least_kv")
class LeastKvUsage(Scorer):
    """Lower KV-cache usage (blocks used / total) is better; among equal usage, fewer
    outstanding requests (the router's count catches a burst before the next scrape).
    Score = 1 - (1 - eps) x usage - eps x n / (n + 1), in (0, 1], with eps = 1e-6."""

    normalized = True

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return _kv_score(instance)

    def score_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[float]:
        return [_kv_score(inst) for inst in instances]


_KV_EPS = 1e-6


def _kv_score(inst: InstanceState) -> float:
    usage = inst.kv_usage
    if usage > 1.0:
        usage = 1.0
    outstanding = inst.outstanding
    return 1.0 - (1.0 - _KV_EPS) * usage - _KV_EPS * outstanding / (outstanding + 1.0)
