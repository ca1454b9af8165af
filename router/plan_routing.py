"""The pool plan's routing table, from the control plane to every router replica.

When the control plane (router/controlplane.py) re-solves the plan, it writes the plan's
length-bucket routing table to the state store under `controlplane:routing` (the load
table, as the drains and the workload histograms are kept), with a version that grows
with every new plan. Each router replica whose policy routes by a plan (a `length_bucket`
filter in some profile) reads it back every few seconds (`RoutingFollower.refresh`, from
the router's policy resync loop) and, when the version is new, hands it to its decision
layer (`DecisionLayer.set_routing_table`), the very call the simulator's autoscaler makes
with its own re-solved plan. So the dispatcher follows the fleet as the autoscaler resizes
it. A malformed document is logged (rate-limited) and ignored: the last good table stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from router.state import StateStore
from scheduler.layer import DecisionLayer
from scheduler.planner.problem import PlanError
from scheduler.planner.routing import RoutingTable
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)

ROUTING_KEY = "controlplane:routing"
ROUTING_TTL_S = 7 * 86400.0  # outlives any pause of the control plane; a new plan overwrites it


@dataclass(frozen=True, slots=True)
class PublishedRouting:
    version: int
    table: RoutingTable
    usd_per_hour: float


async def publish_routing(store: StateStore, version: int, table: RoutingTable, usd_per_hour: float) -> None:
    await store.put_load(ROUTING_KEY, {"version": version, "table": table.as_dict(),
                                       "usd_per_hour": round(usd_per_hour, 6)}, ROUTING_TTL_S)


def parse_routing(doc: Any) -> PublishedRouting:
    """The stored document, validated; PlanError names what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), int) or isinstance(doc.get("version"), bool):
        raise PlanError(f"{ROUTING_KEY}: expected {{version: int, table: {{...}}, usd_per_hour}}")
    table = RoutingTable.from_dict(doc.get("table"), f"{ROUTING_KEY}.table")
    cost = doc.get("usd_per_hour", 0.0)
    return PublishedRouting(doc["version"], table, float(cost) if isinstance(cost, int | float) else 0.0)


class RoutingFollower:
    """One router replica's copy of the published routing table."""

    def __init__(self, layer: DecisionLayer) -> None:
        self.layer = layer
        self.version: int | None = None
        self._warn = RateLimitedLog(log, interval_s=60.0)

    @property
    def active(self) -> bool:
        """Whether any profile routes by a plan (else nothing is read)."""
        from scheduler.policies.length_bucket import LengthBucket

        return any(isinstance(part, LengthBucket) for policy in self.layer.all_policies()
                   for part in getattr(policy, "filters", ()))

    async def refresh(self, store: StateStore) -> bool:
        """Apply the published table if it is new; True when it was applied."""
        doc = (await store.get_loads()).get(ROUTING_KEY)
        if doc is None:
            return False
        try:
            published = parse_routing(doc)
        except PlanError as exc:
            self._warn.warning("routing", "published routing table is invalid; keeping the current one",
                               extra={"error": str(exc)})
            return False
        if published.version == self.version:
            return False
        updated = self.layer.set_routing_table(published.table)
        self.version = published.version
        log.info("routing table of the new pool plan applied",
                 extra={"version": published.version, "filters": updated, "usd_per_hour": published.usd_per_hour})
        return True
