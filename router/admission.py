"""The router's side of admission (flow control): it holds the scheduler's `AdmissionQueue`
and turns its verdicts into waits and HTTP answers.

A request whose model is saturated (scheduler/admission.py decides that, as it does in the
simulator) waits here, not in an engine queue where no policy of ours can reorder, shed or
move it. It leaves the queue when:
- capacity frees (a request through this router finishes, or the load ticker sees the
  scraped load fall): the queue releases held requests in queue-sort order. A released
  request's pick is reserved (counted in flight on its instance) until its own dispatch
  counts it, so one freed slot releases one request, not the whole queue;
- its class's queue timeout passes: 429 + Retry-After if the class is sheddable, else 503;
- it is evicted by a non-sheddable arrival to a full queue (429 + Retry-After);
- its client disconnects: it leaves the queue at once, nothing is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.dispatcher import Dispatcher
from router.metrics import RouterMetrics
from scheduler.admission import AdmissionQueue, Offer, Verdict
from scheduler.queueing import QueuedRequest
from scheduler.types import RequestInfo

log = logging.getLogger(__name__)

TICK_S = 0.02  # how often the held queue re-checks scraped load while it is not empty


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer instead of a dispatch: HTTP status, message, Retry-After seconds (429)."""

    status: int  # 429, 503, or 499 (the client left: nothing is sent)
    message: str
    retry_after_s: float | None = None


class PluginMetrics:
    """A `scheduler.dispatch.PluginObserver` feeding the router's per-plugin histogram.

    It times one decision in `sample_every`: timing every part of every decision (two
    clock reads and a histogram update per part) added ~8 us to a ~10 us decision."""

    def __init__(self, metrics: RouterMetrics, sample_every: int = 16) -> None:
        self.metrics = metrics
        self.sample_every = sample_every
        self._count = 0

    def sample(self) -> bool:
        self._count += 1
        if self._count >= self.sample_every:
            self._count = 0
            return True
        return False

    def clock_s(self) -> float:
        return time.perf_counter()

    def observe(self, kind: str, name: str, seconds: float) -> None:
        self.metrics.child(self.metrics.plugin_seconds, kind, name).observe(seconds)


class RouterAdmission:
    def __init__(self, dispatcher: Dispatcher, metrics: RouterMetrics, queue: AdmissionQueue) -> None:
        self.dispatcher = dispatcher
        self.layer = dispatcher.layer
        self.metrics = metrics
        self.queue = queue
        self.retry_after_s = dispatcher.layer.document.admission.retry_after_s
        self._waiters: dict[str, asyncio.Future[tuple[Verdict, str | None]]] = {}
        self._keys = itertools.count(1)
        self._ticker: asyncio.Task[None] | None = None
        # Called for a request held because no instance of its model is up (a pool scaled
        # to zero, `hold_until_ready`): the router counts it as demand, or the control plane,
        # which plans from answered requests, would never start an instance for it.
        self.on_held_at_zero: Callable[[RequestInfo], None] | None = None

    def _saturated(self, info: RequestInfo) -> bool:
        return self.layer.saturated(self.dispatcher.candidates(info.model), info)

    async def admit(self, info: RequestInfo, receive: Any) -> tuple[Refusal | None, str | None]:
        """(None, reserved instance) to dispatch now, or (a refusal, None). The caller
        releases the reservation (`unreserve`) right before its own dispatch counts."""
        self.release()
        now_s = time.monotonic()
        slo = self.layer.slo_classes.get(info.slo_class)
        held, offer = self.offer(info, now_s)
        if offer.evicted is not None:
            self._wake(offer.evicted, Verdict.SHED, None)
        if offer.verdict is Verdict.ADMIT:
            return None, None
        if offer.verdict is not Verdict.QUEUE:
            return self._refusal(offer.verdict, info.slo_class, offer.reason), None
        if self.on_held_at_zero is not None and not any(
                s.healthy and not s.draining for s in self.dispatcher.candidates(info.model)):
            self.on_held_at_zero(info)
        future: asyncio.Future[tuple[Verdict, str | None]] = asyncio.get_running_loop().create_future()
        self._waiters[held.request_id] = future
        self._gauge(info.slo_class)
        self._ensure_ticker()
        disconnect = asyncio.ensure_future(receive())
        outcome = "released"
        handed_over = False
        try:
            await asyncio.wait({future, disconnect}, timeout=self.queue.timeout_s(slo),
                               return_when=asyncio.FIRST_COMPLETED)
            if future.done():
                verdict, reserved = future.result()
                if verdict is Verdict.ADMIT:
                    handed_over = True
                    return None, reserved
                outcome = "shed"
                return self._refusal(verdict, info.slo_class, "evicted from a full admission queue"), None
            self.queue.cancel(held.request_id)
            if disconnect.done():
                outcome = "cancelled"
                return Refusal(499, "the client disconnected while queued"), None
            outcome = "timeout"
            verdict = Verdict.SHED if slo is not None and slo.sheddable else Verdict.REJECT
            return self._refusal(verdict, info.slo_class, f"waited {self.queue.timeout_s(slo):.3g} s in the "
                                                           f"admission queue (the class's queue timeout)"), None
        finally:
            disconnect.cancel()
            if future.done() and not handed_over and not future.cancelled():
                self.unreserve(future.result()[1])  # released, but this request is not going
            self._waiters.pop(held.request_id, None)
            self.queue.cancel(held.request_id)
            self._gauge(info.slo_class)
            self.metrics.child(self.metrics.queue_wait, info.slo_class, outcome).observe(
                time.monotonic() - now_s)

    def offer(self, info: RequestInfo, now_s: float) -> tuple[RequestInfo, Offer]:
        """The admission queue's answer to an arrival (the simulator's `Simulation.offer`),
        with the request as queued: the queue keys by request id, and a client may reuse
        one, so the queue gets its own."""
        held = dataclasses.replace(info, request_id=f"{info.request_id}#{next(self._keys)}")
        offer = self.queue.offer(held, self.layer.slo_classes.get(info.slo_class), self._saturated(info), now_s)
        return held, offer

    def _refusal(self, verdict: Verdict, slo_class: str, reason: str) -> Refusal:
        if verdict is Verdict.SHED:
            return Refusal(429, f"overloaded: requests of SLO class '{slo_class}' are shed ({reason}); retry later",
                           self.retry_after_s)
        return Refusal(503, f"no instance can serve this request in time ({reason})")

    def _wake(self, item: QueuedRequest, verdict: Verdict, reserved: str | None) -> None:
        future = self._waiters.get(item.request.request_id)
        if future is not None and not future.done():
            future.set_result((verdict, reserved))
        elif reserved is not None:
            self.unreserve(reserved)

    def release(self) -> None:
        """Release held requests, in queue-sort order, while their model has capacity; each
        released one's pick is reserved so the next check sees it."""
        queue = self.queue
        if not len(queue):
            return
        now_s = time.monotonic()

        def can_release(item: QueuedRequest) -> bool:
            return not self._saturated(item.request)

        while (item := queue.release(now_s, can_release)) is not None:
            reserved = self._reserve(item.request)
            self._wake(item, Verdict.ADMIT, reserved)
            self._gauge(item.request.slo_class)

    def _reserve(self, info: RequestInfo) -> str | None:
        """Count a released request in flight on its model's least-loaded unsaturated
        instance until its own dispatch counts it. No policy part runs here: the request's
        one decision comes after, so RNG-driven parts (window, random pickers) draw exactly
        as in the simulator, which releases and decides in one step."""
        slo = self.layer.slo_classes.get(info.slo_class)
        detector = self.layer.detector
        best = None
        for state in self.dispatcher.candidates(info.model):
            if not state.healthy or state.draining or state.cordoned or detector.instance_saturated(state, info, slo):
                continue
            if best is None or (state.outstanding, state.instance_id) < (best.outstanding, best.instance_id):
                best = state
        if best is None:
            return None  # nothing free after all: its own decision answers for it
        self.dispatcher.registry.inflight_started(best.instance_id)
        return best.instance_id

    def unreserve(self, instance_id: str | None) -> None:
        if instance_id is not None:
            self.dispatcher.registry.inflight_finished(instance_id)

    def _gauge(self, slo_class: str) -> None:
        depth = self.queue.depth_by_class().get(slo_class, 0)
        self.metrics.child(self.metrics.queue_length, slo_class).set(depth)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        """Scraped load can fall without a request of ours finishing: re-check it."""
        while len(self.queue):
            await asyncio.sleep(TICK_S)
            try:
                self.release()
            except Exception as exc:  # a bug here must not strand the queue silently
                log.warning("admission release failed", extra={"error": str(exc)})

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
