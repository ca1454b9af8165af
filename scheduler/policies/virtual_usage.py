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

import pydantic

from scheduler.dispatch_parts import DispatchContext, PolicyConfigError, Scorer, register_scorer
from scheduler.priority_headroom import NO_HEADROOM, PriorityHeadroom, PriorityHeadroomError
from scheduler.types import InstanceState, RequestInfo


def virtual_usage(instance: InstanceState, headroom: PriorityHeadroom = NO_HEADROOM) -> float:
    """(KV blocks held + blocks of the queue + priority headroom) / KV blocks; 0 when
    unknown. The queue's blocks are the driver's `kv_blocks_queued` when it knows them,
    else estimated; the headroom is counted from `running_by_priority` (none when unknown)."""
    total = instance.kv_blocks_total
    if total <= 0:
        return 0.0
    queued = 0.0
    if instance.kv_blocks_queued is not None:
        queued = float(instance.kv_blocks_queued)
    elif instance.waiting:
        per_request = instance.kv_blocks_used / instance.running if instance.running else 0.0
        queued = instance.waiting * per_request
    reserve = headroom.blocks(headroom.high_priority_running(instance.running_by_priority))
    return (instance.kv_blocks_used + queued + reserve) / total


@register_scorer("least_virtual_usage")
class LeastVirtualUsage(Scorer):
    """Lower virtual usage is better; among equal, fewer outstanding requests.
    Score = 1 / (1 + usage + eps x outstanding), in (0, 1]: virtual usage exceeds 1 when
    the queue does, so `1 - usage` would not do. (It once returned `-usage`, which the
    dispatcher clamps to 0 for every instance: all ties, so every request went to the
    first instance; issue 13's meltdown at load x1.4.)

    Parameters: `priority_headroom_blocks` (0) and `high_priority_below` (0), the headroom
    term (module docstring)."""

    normalized = True

    class Params(pydantic.BaseModel):
        """What a profile may set (the typed parameter class `check_params` reads)."""

        model_config = pydantic.ConfigDict(extra="forbid")
        priority_headroom_blocks: int = pydantic.Field(default=0, ge=0)
        high_priority_below: int = 0

    def __init__(self, priority_headroom_blocks: int = 0, high_priority_below: int = 0) -> None:
        try:
            self.headroom = PriorityHeadroom(priority_headroom_blocks, high_priority_below)
        except PriorityHeadroomError as exc:
            raise PolicyConfigError(f"least_virtual_usage.{exc}") from None

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return 1.0 / (1.0 + virtual_usage(instance, self.headroom) + 1e-6 * instance.outstanding)
