"""Dispatch by virtual usage: the load measure the migration policy balances (Llumnix).

`least_virtual_usage` scores an instance by the KV blocks its running requests hold plus
what its queued requests will need, over its blocks: lower is better. The queued demand is
`InstanceState.kv_blocks_queued` when the driver knows it (the simulator's cores, the
Worker status stream), else estimated as waiting requests times the mean blocks of a
running one (a vLLM /metrics scrape). Counting it exactly is what keeps a KV-only view
from piling arrivals onto an instance whose queue holds no blocks yet (issue 13,
docs/benchmarks.md "Live migration", fourth round). Dispatching on the same
measure the migration policy (scheduler/migration.py) moves requests on keeps the two
from working against each other: a KV-only dispatcher sends every arrival to an
instance that migration has just emptied of decodes, although its queue is long.
"""

from __future__ import annotations

from scheduler.dispatch_parts import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo


def virtual_usage(instance: InstanceState) -> float:
    """(KV blocks held + blocks of the queue) / KV blocks; 0 when unknown. The queue's
    blocks are the driver's `kv_blocks_queued` when it knows them, else estimated."""
    total = instance.kv_blocks_total
    if total <= 0:
        return 0.0
    queued = 0.0
    if instance.kv_blocks_queued is not None:
        queued = float(instance.kv_blocks_queued)
    elif instance.waiting:
        per_request = instance.kv_blocks_used / instance.running if instance.running else 0.0
        queued = instance.waiting * per_request
    return (instance.kv_blocks_used + queued) / total


@register_scorer("least_virtual_usage")
class LeastVirtualUsage(Scorer):
    """Lower virtual usage is better; among equal, fewer outstanding requests.
    Score = 1 / (1 + usage + eps x outstanding), in (0, 1]: virtual usage exceeds 1 when
    the queue does, so `1 - usage` would not do. (It once returned `-usage`, which the
    dispatcher clamps to 0 for every instance: all ties, so every request went to the
    first instance; issue 13's meltdown at load x1.4.)"""

    normalized = True

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return 1.0 / (1.0 + virtual_usage(instance) + 1e-6 * instance.outstanding)
