"""Load-balancing scorers: least outstanding requests."""

from __future__ import annotations

from scheduler.dispatch_parts import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo

try:  # see scheduler/dispatch_parts.py
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - mypy is a dev dependency
    from scheduler.dispatch_parts import _no_mypyc_attr as mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastOutstanding(Scorer):
    """Fewer requests on the instance (scraped or router-side, whichever is larger) is better:
    1 / (1 + outstanding), so an idle instance scores 1 and the score halves by the first
    request (the steepest where it matters: between nearly idle instances)."""

    reads_progress = False
    normalized = True

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return 1.0 / (1.0 + instance.outstanding)

    def score_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[float]:
        # InstanceState.outstanding inlined: max(running + waiting, router_inflight).
        return [
            1.0 / (1.0 + (scraped if (scraped := inst.running + inst.waiting) > inst.router_inflight
                          else inst.router_inflight))
            for inst in instances
        ]


# Registered after the classes, not by a class decorator: mypyc compiles a decorated class
# as a plain Python class (the router's --native build, router/native.py).
register_scorer("least_outstanding")(LeastOutstanding)
