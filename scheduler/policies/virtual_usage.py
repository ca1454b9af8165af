"""Dispatch by virtual usage: the load measure the migration policy balances (Llumnix).

`least_virtual_usage` scores an instance by the KV blocks its running requests hold plus
an estimate of what its queued requests will need (waiting requests times the mean
blocks of a running one), over its blocks: lower is better. Dispatching on the same
measure the migration policy (scheduler/migration.py) moves requests on keeps the two
from working against each other: a KV-only dispatcher sends every arrival to an
instance that migration has just emptied of decodes, although its queue is long.
"""

from __future__ import annotations

from scheduler.dispatch import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo


def virtual_usage(instance: InstanceState) -> float:
    """(KV blocks held + estimated blocks of the queue) / KV blocks; 0 when unknown."""
    total = instance.kv_blocks_total
    if total <= 0:
        return 0.0
    queued = 0.0
    if instance.waiting:
        per_request = instance.kv_blocks_used / instance.running if instance.running else 0.0
        queued = instance.waiting * per_request
    return (instance.kv_blocks_used + queued) / total


@register_scorer("least_virtual_usage")
class LeastVirtualUsage(Scorer):
    """Lower virtual usage is better; among equal, fewer outstanding requests."""

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return -(virtual_usage(instance) + 1e-6 * instance.outstanding)
