"""Load-balancing scorers: least outstanding requests."""

from __future__ import annotations

from scheduler.dispatch import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo


@register_scorer("least_outstanding")
class LeastOutstanding(Scorer):
    """Fewer requests on the instance (scraped or router-side, whichever is larger) is better."""

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return -float(instance.outstanding)
