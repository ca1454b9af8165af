"""Load-balancing scorers: least outstanding requests."""

from __future__ import annotations

from scheduler.dispatch import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo


@register_scorer("least_outstanding")
class LeastOutstanding(Scorer):
    """Fewer requests on the instance (scraped or router-side, whichever is larger) is better."""

    reads_progress = False

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return -float(instance.outstanding)

    def score_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[float]:
        # InstanceState.outstanding inlined: max(running + waiting, router_inflight).
        return [
            -float(scraped if (scraped := inst.running + inst.waiting) > inst.router_inflight else inst.router_inflight)
            for inst in instances
        ]
