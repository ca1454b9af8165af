"""Admission (flow control): hold requests in the driver while every engine is saturated,
release them in queue-sort order as capacity frees, shed what cannot wait.

Both drivers run the same calls on the same `AdmissionQueue`:

    verdict = queue.offer(request, slo, saturated=detector.saturated(group, request, slo), now_s=t)
    # ADMIT: dispatch now; QUEUE: hold it; SHED (429 + Retry-After) or REJECT (503): answer it
    while (item := queue.release(t, can_release)) is not None: dispatch(item)   # capacity freed
    for item, verdict in queue.expire(t): answer(item, verdict)                 # queue timeouts
    queue.cancel(request_id)                                                    # client left

Rules, in order: an unsaturated model admits at once. A saturated one queues the request
while the queue has room. A full queue sheds the arrival if its class is sheddable, else
evicts the last-ordered sheddable request held (shed) to make room, else answers 503. A
held request waits at most its class's `queue_timeout_ms` (else the document's default);
then a sheddable one is shed, any other gets 503. Release order is the `QueueSort`'s (key
smallest first, recomputed at each release so a starvation guard can promote).

The saturation detector checks each usable instance of the request's model against the
configured criteria (queued requests, outstanding requests, KV usage, predicted TTFT as a
fraction of the class's TTFT target; a class may have criteria of its own); the model is
saturated when every one is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.policy_document import AdmissionSpec, SaturationSpec
from scheduler.queueing import QueuedRequest, QueueSort
from scheduler.types import InstanceState, RequestInfo, SloClass


class Verdict(enum.Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    SHED = "shed"  # 429 with Retry-After: the class is sheddable
    REJECT = "reject"  # 503: nothing can serve it in time


@dataclass(frozen=True, slots=True)
class Offer:
    """The answer to an arrival, and a held request evicted to make room for it (shed)."""

    verdict: Verdict
    evicted: QueuedRequest | None = None
    reason: str = ""


TtftPredictor = Callable[[RequestInfo, InstanceState], float]


class SaturationDetector:
    """Whether a model's instances can take one more request now (see module docstring)."""

    def __init__(self, spec: SaturationSpec, predict_ttft_s: TtftPredictor | None = None,
                 by_slo_class: Mapping[str, SaturationSpec] | None = None, hold_until_ready: bool = False) -> None:
        self.spec = spec
        self.hold_until_ready = hold_until_ready  # AdmissionSpec.hold_until_ready
        self.by_slo_class = dict(by_slo_class or {})
        needs_ttft = any(s.max_predicted_ttft_ratio is not None for s in (spec, *self.by_slo_class.values()))
        if needs_ttft and predict_ttft_s is None:
            from scheduler.policies.slo_headroom import SloHeadroom

            predict_ttft_s = SloHeadroom().predicted_ttft_s
        self.predict_ttft_s = predict_ttft_s

    def instance_saturated(self, inst: InstanceState, request: RequestInfo, slo: SloClass | None) -> bool:
        spec = self.by_slo_class.get(request.slo_class, self.spec) if self.by_slo_class else self.spec
        outstanding = inst.outstanding
        if spec.max_queued_per_instance is not None:
            queued = max(inst.waiting, outstanding - inst.running)
            if queued >= spec.max_queued_per_instance and outstanding > 0:
                return True
        if spec.max_outstanding_per_instance is not None and outstanding >= spec.max_outstanding_per_instance:
            return True
        if spec.max_kv_usage is not None and inst.kv_blocks_total > 0 and inst.kv_usage >= spec.max_kv_usage:
            return True
        if spec.max_predicted_ttft_ratio is not None and slo is not None and self.predict_ttft_s is not None:
            limit_s = spec.max_predicted_ttft_ratio * slo.ttft_slo_ms / 1000.0
            if self.predict_ttft_s(request, inst) > limit_s:
                return True
        return False

    def saturated(self, group: Sequence[InstanceState], request: RequestInfo, slo: SloClass | None) -> bool:
        """True when every usable instance is saturated. With none usable: False (dispatch
        then answers that nothing serves the model), or, with `hold_until_ready` and
        instances that may come up (a pool scaling from zero), True: the request waits.

        Under overload every instance is checked on every arrival and release, so without a
        TTFT criterion the checks of `instance_saturated` are inlined (0.28 ms at 1,000
        saturated instances through the method; tests/test_admission.py compares both)."""
        spec = self.by_slo_class.get(request.slo_class, self.spec) if self.by_slo_class else self.spec
        if spec.max_predicted_ttft_ratio is not None:
            return self._saturated_by_method(group, request, slo)
        max_queued = spec.max_queued_per_instance
        max_outstanding = spec.max_outstanding_per_instance
        max_kv = spec.max_kv_usage
        usable = False
        for inst in group:
            if not inst.healthy or inst.draining or inst.cordoned:
                continue
            usable = True
            running = inst.running
            waiting = inst.waiting
            scraped = running + waiting
            inflight = inst.router_inflight
            outstanding = scraped if scraped > inflight else inflight
            if max_queued is not None and outstanding > 0:
                queued = outstanding - running
                if (waiting if waiting > queued else queued) >= max_queued:
                    continue
            if max_outstanding is not None and outstanding >= max_outstanding:
                continue
            if max_kv is not None:
                total = inst.kv_blocks_total
                if total > 0 and inst.kv_blocks_used / total >= max_kv:
                    continue
            return False
        return usable or (self.hold_until_ready and bool(group))

    def _saturated_by_method(self, group: Sequence[InstanceState], request: RequestInfo,
                             slo: SloClass | None) -> bool:
        """`saturated`'s definition, one `instance_saturated` call per instance."""
        usable = False
        for inst in group:
            if not inst.healthy or inst.draining or inst.cordoned:
                continue
            usable = True
            if not self.instance_saturated(inst, request, slo):
                return False
        return usable or (self.hold_until_ready and bool(group))


class AdmissionQueue:
    """The held requests of one driver (bounded by `max_queue_depth`)."""

    def __init__(self, spec: AdmissionSpec, sort: QueueSort) -> None:
        self.spec = spec
        self.sort = sort
        self._held: dict[str, QueuedRequest] = {}  # request id -> item, in arrival order
        self._seq = 0
        self.shed_total = 0
        self.rejected_total = 0

    def __len__(self) -> int:
        return len(self._held)

    def depth_by_class(self) -> dict[str, int]:
        depth: dict[str, int] = {}
        for item in self._held.values():
            depth[item.request.slo_class] = depth.get(item.request.slo_class, 0) + 1
        return depth

    def timeout_s(self, slo: SloClass | None) -> float:
        ms = slo.queue_timeout_ms if slo is not None and slo.queue_timeout_ms is not None \
            else self.spec.default_queue_timeout_ms
        return ms / 1000.0

    def offer(self, request: RequestInfo, slo: SloClass | None, saturated: bool, now_s: float) -> Offer:
        if not saturated:
            # Requests still held wait for another model's capacity (the driver releases
            # before it offers), so this one does not jump ahead of its own model's queue.
            return Offer(Verdict.ADMIT)
        sheddable = slo is not None and slo.sheddable
        if len(self._held) < self.spec.max_queue_depth:
            self._push(request, slo, now_s)
            return Offer(Verdict.QUEUE)
        if sheddable:
            self.shed_total += 1
            return Offer(Verdict.SHED, reason="admission queue full")
        victim = self._last_sheddable(now_s)
        if victim is not None:
            del self._held[victim.request.request_id]
            self.shed_total += 1
            self._push(request, slo, now_s)
            return Offer(Verdict.QUEUE, evicted=victim, reason="evicted for a request of a non-sheddable class")
        self.rejected_total += 1
        return Offer(Verdict.REJECT, reason="admission queue full")

    def _push(self, request: RequestInfo, slo: SloClass | None, now_s: float) -> None:
        self._seq += 1
        self._held[request.request_id] = QueuedRequest(request, slo, now_s, self._seq)

    def _ordered(self, now_s: float) -> list[QueuedRequest]:
        key = self.sort.key
        return sorted(self._held.values(), key=lambda item: (*key(item, now_s), item.seq))

    def _last_sheddable(self, now_s: float) -> QueuedRequest | None:
        for item in reversed(self._ordered(now_s)):
            if item.slo_class is not None and item.slo_class.sheddable:
                return item
        return None

    def peek_order(self, now_s: float) -> list[str]:
        """The held request ids in release order (tests, parity)."""
        return [item.request.request_id for item in self._ordered(now_s)]

    def release(self, now_s: float, can_release: Callable[[QueuedRequest], bool]) -> QueuedRequest | None:
        """The first held request in sort order that `can_release` accepts (its model has
        capacity), removed; None when none can go. Requests that arrived earlier and stay
        held count it in `passed_over` (for starvation guards)."""
        if not self._held:
            return None
        for item in self._ordered(now_s):
            if can_release(item):
                del self._held[item.request.request_id]
                for other in self._held.values():
                    if other.seq < item.seq:
                        other.passed_over += 1
                return item
        return None

    def expire(self, now_s: float) -> list[tuple[QueuedRequest, Verdict]]:
        """Held requests past their class's queue timeout, removed, each with its answer."""
        expired: list[tuple[QueuedRequest, Verdict]] = []
        for request_id, item in list(self._held.items()):
            # The same expression as next_deadline_s: a driver waking at that deadline expires it.
            if item.enqueued_s + self.timeout_s(item.slo_class) <= now_s:
                del self._held[request_id]
                if item.slo_class is not None and item.slo_class.sheddable:
                    self.shed_total += 1
                    expired.append((item, Verdict.SHED))
                else:
                    self.rejected_total += 1
                    expired.append((item, Verdict.REJECT))
        return expired

    def next_deadline_s(self) -> float | None:
        """When the next held request times out (None: nothing held)."""
        if not self._held:
            return None
        return min(item.enqueued_s + self.timeout_s(item.slo_class) for item in self._held.values())

    def cancel(self, request_id: str) -> bool:
        """The client left: drop its request at once. False if it was not held."""
        return self._held.pop(request_id, None) is not None

    def holds(self, request_id: str) -> bool:
        return request_id in self._held
