"""One live pool's next step toward its target: what to drain, take back, and remove.

The live control plane (router/controlplane.py) knows a pool's Deployment size (the
platform's replica count, which includes instances still starting and not yet in the
registry) and the registry's instances with their engine-reported in-flight counts; the
simulator's `reconcile` (autoscale.py) knows every instance. This is the live variant:

- target >= replicas: every instance this control plane drained is taken back (warm),
  and the replica count is raised to the target;
- target < replicas: replicas with no registry instance (pods starting or crashing:
  no traffic) are dropped first; of the rest of the excess, that many instances must be
  draining; more are drained (emptiest first, ties by id so two runs agree), extras
  taken back;
- a draining instance is removable once `grace_s` has passed since its drain began
  (routers follow the draining flag through the store within their watch delay, and a
  request dispatched just before reaches the engine a moment later) and its engine
  reports nothing in flight; the replica count then drops by exactly the removable ones, so a
  scale-down never aborts a request;
- an in-flight count that could not be read (None) counts as busy.

Only instances drained by this control plane are ever removed (an operator's own drain
is left alone).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LiveInstance:
    instance_id: str
    draining: bool
    inflight: int | None  # running + waiting on the engine; None: unknown (busy)
    drained_since_s: float | None = None  # when this control plane drained it (None: not ours)


@dataclass(frozen=True, slots=True)
class PoolStep:
    drain: tuple[str, ...] = ()
    undrain: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()  # drained and empty: the replica count drops by these
    replicas: int | None = None  # the replica count to set now (None: leave it)


def _removable(inst: LiveInstance, now_s: float, grace_s: float) -> bool:
    # After `grace_s` every request dispatched before the drain reached the engine and no
    # new one is sent, so an engine that reports nothing in flight now stays empty.
    return inst.drained_since_s is not None and inst.inflight == 0 and now_s - inst.drained_since_s >= grace_s


def pool_step(target: int, replicas: int, instances: Sequence[LiveInstance], now_s: float,
              grace_s: float) -> PoolStep:
    """The next step of one pool (see the module docstring)."""
    ours = [i for i in instances if i.draining and i.drained_since_s is not None]
    ready = [i for i in instances if not i.draining]
    if target >= replicas:
        return PoolStep(undrain=tuple(sorted(i.instance_id for i in ours)),
                        replicas=target if target > replicas else None)
    # Replicas without a registry instance (starting, crashing) carry no traffic: they go
    # first, and the ReplicaSet removes not-ready pods before ready ones.
    phantom = min(max(0, replicas - len(instances)), replicas - target)
    excess = replicas - target - phantom
    undrain: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    if len(ours) > excess:
        # Keep the emptiest draining ones; the busiest go back to work.
        order = sorted(ours, key=lambda i: (-(i.inflight if i.inflight is not None else 1 << 30), i.instance_id))
        undrain = tuple(i.instance_id for i in order[:len(ours) - excess])
    elif len(ours) < excess:
        order = sorted(ready, key=lambda i: (i.inflight if i.inflight is not None else 1 << 30, i.instance_id))
        drain = tuple(i.instance_id for i in order[:excess - len(ours)])
    kept = [i for i in ours if i.instance_id not in undrain]
    remove = tuple(sorted(i.instance_id for i in kept if _removable(i, now_s, grace_s)))
    dropped = phantom + len(remove)
    return PoolStep(drain=drain, undrain=undrain, remove=remove, replicas=replicas - dropped if dropped else None)


def last_request_by_pool(last_slot_end_s: Mapping[int, float], shares: Sequence[Mapping[str, float]],
                         pools: Collection[str]) -> dict[str, float]:
    """The newest time each pool may have received traffic: over the buckets routed to
    it (by the plan's shares), the end of the newest histogram slot with requests."""
    out = {pool: float("-inf") for pool in pools}
    for k, seen_s in last_slot_end_s.items():
        if k >= len(shares):
            continue
        for pool in shares[k]:
            if pool in out and seen_s > out[pool]:
                out[pool] = seen_s
    return out
