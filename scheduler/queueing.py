"""Queue ordering extension point: which queued request an engine runs first.

A queue policy turns what the scheduler knows about a request (its SLO class, later its
predicted output-length rank) into the integer `priority` that vLLM's priority scheduling
takes (lower runs earlier). Drivers attach it to every request they send: the router in
the `priority` field of the forwarded body, the simulator on the engine core's request.
Policies register by name, like dispatch parts, and are chosen in config:

    queue: {policy: slo_priority}

`needs_engine_priority` tells drivers whether the engines must run with
`scheduling_policy=priority`; with `fcfs` every request gets 0 and engines stay FCFS.
A learned length-rank policy (shortest predicted job first with a starvation guard) is
one more module registering itself here (scheduler.rank_queue); scheduler.queue_orders
builds a policy or a sort by name from every module that registers one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from scheduler.types import RequestInfo, SloClass


class QueuePolicyError(ValueError):
    """Unknown queue policy or bad parameters; the message lists what is allowed."""


class QueuePolicy:
    """Computes the engine priority of a request (lower runs earlier)."""

    name: ClassVar[str] = ""
    needs_engine_priority: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        if params:
            raise QueuePolicyError(f"queue policy {self.name!r} takes no parameters, got {sorted(params)}")

    def priority(self, request: RequestInfo, slo_class: SloClass | None, now_s: float) -> int:
        raise NotImplementedError


QUEUE_POLICIES: dict[str, type[QueuePolicy]] = {}

_Q = TypeVar("_Q", bound=type[QueuePolicy])


def register_queue_policy(name: str) -> Callable[[_Q], _Q]:
    def wrap(cls: _Q) -> _Q:
        cls.name = name
        QUEUE_POLICIES[name] = cls
        return cls

    return wrap


@register_queue_policy("fcfs")
class FirstComeFirstServed(QueuePolicy):
    """Every request has priority 0: engines run them in arrival order."""

    needs_engine_priority = False

    def priority(self, request: RequestInfo, slo_class: SloClass | None, now_s: float) -> int:
        return 0


@register_queue_policy("slo_priority")
class SloPriority(QueuePolicy):
    """The request's SLO class priority (e.g. interactive 0 before default 1 before batch 2);
    arrival order within a class. A request of an unknown class gets `unknown_priority`."""

    def __init__(self, unknown_priority: int = 1) -> None:
        if isinstance(unknown_priority, bool) or not isinstance(unknown_priority, int):
            raise QueuePolicyError(f"unknown_priority: expected an integer, got {unknown_priority!r}")
        self.unknown_priority = unknown_priority

    def priority(self, request: RequestInfo, slo_class: SloClass | None, now_s: float) -> int:
        return self.unknown_priority if slo_class is None else slo_class.priority


# --- Admission-queue order (the router-side queue of held requests) -----------------------
#
# When every instance is saturated the driver holds requests in its own queue and releases
# them, as capacity frees, in the order a `QueueSort` gives: the smallest key first. Keys
# are recomputed at each release (`now_s` moves, so a starvation guard can promote a
# request that waited too long), which is O(queued) per release: queues held by a router
# are hundreds deep, not millions. Both drivers call it the same way.


@dataclass(slots=True)
class QueuedRequest:
    """One held request as a queue-sort policy sees it."""

    request: RequestInfo
    slo_class: SloClass | None
    enqueued_s: float
    seq: int  # arrival order into the queue; the final tie-break, so order is total
    passed_over: int = 0  # how many requests that arrived later were released before it


class QueueSort:
    """Orders held requests: `key` smallest is released first."""

    name: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        if params:
            raise QueuePolicyError(f"queue sort {self.name!r} takes no parameters, got {sorted(params)}")

    def key(self, item: QueuedRequest, now_s: float) -> tuple[float, ...]:
        raise NotImplementedError


QUEUE_SORTS: dict[str, type[QueueSort]] = {}

_QS = TypeVar("_QS", bound=type[QueueSort])


def register_queue_sort(name: str) -> Callable[[_QS], _QS]:
    def wrap(cls: _QS) -> _QS:
        cls.name = name
        QUEUE_SORTS[name] = cls
        return cls

    return wrap


@register_queue_sort("fcfs")
class FcfsSort(QueueSort):
    """Arrival order."""

    def key(self, item: QueuedRequest, now_s: float) -> tuple[float, ...]:
        return (float(item.seq),)


@register_queue_sort("slo_priority")
class SloPrioritySort(QueueSort):
    """The SLO class's priority first (lower earlier), then arrival order."""

    def __init__(self, unknown_priority: int = 1) -> None:
        if isinstance(unknown_priority, bool) or not isinstance(unknown_priority, int):
            raise QueuePolicyError(f"unknown_priority: expected an integer, got {unknown_priority!r}")
        self.unknown_priority = unknown_priority

    def key(self, item: QueuedRequest, now_s: float) -> tuple[float, ...]:
        prio = self.unknown_priority if item.slo_class is None else item.slo_class.priority
        return (float(prio), float(item.seq))
