"""`length_bucket` filter: keeps the pool the planner's routing table gives a request's
length bucket (scheduler/planner/routing.py), so each pool gets the slice of traffic it
was sized for.

    filters: [model, healthy, not_draining, {length_bucket: {table: <RoutingTable.as_dict()>}}]

The request's prompt length picks the input row; its `max_output_tokens`, when given,
picks the output cell (else the row's mix), or, in a table planned on predicted output
lengths (`output_source: predicted_rank`), the ranker's `predicted_rank` does. A weighted bucket is split by a hash of the
request id. If no instance of the chosen pool is left (scaled to zero, unhealthy), the
next pool of the bucket is tried, then every candidate: a plan that no longer matches
the fleet degrades to plain load balancing rather than rejecting requests.

The table follows the fleet: when the autoscaler re-solves the plan, the driver hands
the new table to every `length_bucket` filter of its policies (`set_routing_table`;
`DecisionLayer.set_routing_table`), the router from the table the control plane
publishes in the state store, the simulator from its own control loop's plan.
"""

from __future__ import annotations

from typing import Any, Protocol

from scheduler.dispatch_parts import (
    DispatchContext,
    Filter,
    PolicyConfigError,
    register_filter,
)
from scheduler.planner.problem import PlanError
from scheduler.planner.routing import RoutingTable
from scheduler.types import InstanceState, RequestInfo


@register_filter("length_bucket")
class LengthBucket(Filter):
    reads_progress = False
    static = False  # depends on the request's length

    def __init__(self, table: Any = None) -> None:
        if table is None:
            raise PolicyConfigError("filter 'length_bucket': parameter 'table' (a routing table) is required")
        if isinstance(table, RoutingTable):
            self.table = table
            return
        try:
            self.table = RoutingTable.from_dict(table, "filter 'length_bucket' table")
        except PlanError as exc:
            raise PolicyConfigError(str(exc)) from exc

    def _pools(self, request: RequestInfo) -> list[str]:
        output = self.table.output_tokens_of(request.max_output_tokens, request.predicted_rank)
        return self.table.pools_for(request.request_id, request.input_tokens, output)

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        """The per-instance rule: in the request's drawn pool (or no table entry). `keep_all`
        adds the fallback to the bucket's other pools when none of the drawn one is left."""
        pools = self._pools(request)
        return not pools or instance.pool == pools[0]

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        pools = self._pools(request)
        for pool in pools:
            kept = [inst for inst in instances if inst.pool == pool]
            if kept:
                return kept
        return instances


class FilteredPolicy(Protocol):
    """What `set_routing_table` reads of a `scheduler.dispatch.DispatchPolicy`: its filters
    (named by shape, not imported: that module imports the policies to register them)."""

    filters: list[Filter]


def set_routing_table(policy: FilteredPolicy, table: RoutingTable) -> int:
    """Give every `length_bucket` filter of `policy` the new table (the next decision uses
    it; the filter is not static, so no cached candidate list holds the old one). Returns
    how many filters took it (0: the policy routes by no plan)."""
    count = 0
    for part in policy.filters:
        if isinstance(part, LengthBucket):
            part.table = table
            count += 1
    return count
