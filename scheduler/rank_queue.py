"""Shortest-predicted-job-first order: the admission-queue sort and the engine priority
built from `RequestInfo.predicted_rank` (predicted ln(1 + output tokens); higher = longer),
with a starvation guard. Both register by name in `scheduler.queueing`:

    queue: {policy: {learned_rank: {max_wait_s: 20}}, sort: {learned_rank: {max_wait_s: 20}}}

Order of precedence (the same in both), first decides:

1. the SLO class priority (lower first; the router resolves tenant priorities into it);
2. (admission queue) a starved request, one that waited `max_wait_s` or was passed over
   `max_passed_over` times, before any other, oldest first;
3. the predicted rank, shortest first (`missing_rank` for a request with none);
4. arrival order.

The engine priority is one integer per request, fixed when it is sent (vLLM's `priority`
cannot change while a request waits), so its guard is aging by construction:
`priority = class x CLASS_STRIDE + round(1000 x (arrival_s + max_wait_s x u))` with
u = clamp(rank / rank_span, 0, 1) in [0, 1]. A request is therefore overtaken only by
requests of its class that arrived less than `max_wait_s` after it (their value is at most
that much lower), which bounds how long newcomers can keep it waiting. The bound is loose:
a later request overtakes by `max_wait_s` x its rank difference / `rank_span`, and real
ranks differ by about a third of `rank_span`, so the realised extra wait is well under
`max_wait_s` (docs/benchmarks.md, guard sweep). With `max_wait_s: null` the priority is
the rank alone (pure SJF, no guard).

`input_length` (shortest prompt first) is the baseline both ways.
"""

from __future__ import annotations

import math
from typing import Any

from scheduler.queueing import (
    QueuedRequest,
    QueuePolicy,
    QueuePolicyError,
    QueueSort,
    register_queue_policy,
    register_queue_sort,
)
from scheduler.types import RequestInfo, SloClass

CLASS_STRIDE = 10**12  # > 1000 x any monotonic clock in seconds (31 years): classes never mix
RANK_RESOLUTION = 1000  # priority steps per unit of rank (per second when aging)
DEFAULT_MISSING_RANK = 5.0  # ln(1 + ~150 tokens): a typical chat answer
DEFAULT_RANK_SPAN = math.log1p(4096)  # a 4k-token answer is the longest the guard tells apart


def _optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise QueuePolicyError(f"{name}: expected a positive number or null, got {value!r}")
    return float(value)


def _optional_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QueuePolicyError(f"{name}: expected a positive integer or null, got {value!r}")
    return value


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QueuePolicyError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueuePolicyError(f"{name}: expected an integer, got {value!r}")
    return value


def _class_priority(slo_class: SloClass | None, unknown_priority: int) -> int:
    return unknown_priority if slo_class is None else slo_class.priority


def request_rank(request: RequestInfo, missing_rank: float) -> float:
    rank = request.predicted_rank
    return missing_rank if rank is None or not math.isfinite(rank) else rank


@register_queue_sort("learned_rank")
class LearnedRankSort(QueueSort):
    """Shortest predicted output first within an SLO class, with a starvation guard."""

    def __init__(
        self,
        max_wait_s: float | None = 30.0,
        max_passed_over: int | None = None,
        missing_rank: float = DEFAULT_MISSING_RANK,
        unknown_priority: int = 1,
    ) -> None:
        self.max_wait_s = _optional_positive("max_wait_s", max_wait_s)
        self.max_passed_over = _optional_count("max_passed_over", max_passed_over)
        self.missing_rank = _finite("missing_rank", missing_rank)
        self.unknown_priority = _int("unknown_priority", unknown_priority)

    def starved(self, item: QueuedRequest, now_s: float) -> bool:
        if self.max_wait_s is not None and now_s - item.enqueued_s >= self.max_wait_s:
            return True
        return self.max_passed_over is not None and item.passed_over >= self.max_passed_over

    def key(self, item: QueuedRequest, now_s: float) -> tuple[float, ...]:
        prio = float(_class_priority(item.slo_class, self.unknown_priority))
        if self.starved(item, now_s):
            return (prio, 0.0, item.enqueued_s, float(item.seq))
        return (prio, 1.0, request_rank(item.request, self.missing_rank), float(item.seq))


@register_queue_sort("input_length")
class InputLengthSort(QueueSort):
    """Shortest prompt first within an SLO class (the no-model baseline); no guard."""

    def __init__(self, unknown_priority: int = 1) -> None:
        self.unknown_priority = _int("unknown_priority", unknown_priority)

    def key(self, item: QueuedRequest, now_s: float) -> tuple[float, ...]:
        prio = float(_class_priority(item.slo_class, self.unknown_priority))
        return (prio, float(item.request.input_tokens), float(item.seq))


@register_queue_policy("learned_rank")
class LearnedRankPriority(QueuePolicy):
    """vLLM priority = SLO class, then predicted rank, aged by arrival time (module docstring)."""

    def __init__(
        self,
        max_wait_s: float | None = 30.0,
        rank_span: float = DEFAULT_RANK_SPAN,
        missing_rank: float = DEFAULT_MISSING_RANK,
        unknown_priority: int = 1,
    ) -> None:
        self.max_wait_s = _optional_positive("max_wait_s", max_wait_s)
        span = _optional_positive("rank_span", rank_span)
        if span is None:
            raise QueuePolicyError("rank_span: expected a positive number")
        self.rank_span: float = span
        self.missing_rank = _finite("missing_rank", missing_rank)
        self.unknown_priority = _int("unknown_priority", unknown_priority)

    def priority(self, request: RequestInfo, slo_class: SloClass | None, now_s: float) -> int:
        base = _class_priority(slo_class, self.unknown_priority) * CLASS_STRIDE
        rank = request_rank(request, self.missing_rank)
        if self.max_wait_s is None:
            return base + round(min(max(rank, 0.0), 1e6) * RANK_RESOLUTION)
        share = min(max(rank / self.rank_span, 0.0), 1.0)
        arrival_s = request.arrival_s if request.arrival_s > 0 else now_s
        return base + round((max(arrival_s, 0.0) + self.max_wait_s * share) * RANK_RESOLUTION)


@register_queue_policy("input_length")
class InputLengthPriority(QueuePolicy):
    """vLLM priority = SLO class, then prompt tokens (shortest prompt first)."""

    def __init__(self, unknown_priority: int = 1) -> None:
        self.unknown_priority = _int("unknown_priority", unknown_priority)

    def priority(self, request: RequestInfo, slo_class: SloClass | None, now_s: float) -> int:
        return _class_priority(slo_class, self.unknown_priority) * CLASS_STRIDE + max(0, request.input_tokens)
