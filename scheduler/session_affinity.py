"""Session affinity behind one interface: a session's requests go to the instance that
served it, keyed per tenant.

The key is (tenant, model, session id): one tenant sending another's session id lands in
its own entry, never on the other tenant's instance. The claim protocol is the same for
both drivers: claim the session for this decision's pick (an existing owner wins); if
the owner can no longer serve, drop it and claim again; the usable owner goes first in
the decision. The live table is the router's shared state store (atomic SET NX in
Redis, so replicas agree; async, in router/dispatcher.py); the simulated one is
`InMemoryAffinity`, with the clock passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from scheduler.types import Decision, InstanceState, RequestInfo


def affinity_key(request: RequestInfo) -> str:
    """The table key of a request's session (length-prefixed, so no tenant name can forge
    another's key by containing the separator)."""
    tenant = request.tenant
    return f"{len(tenant)}:{tenant}:{request.model.lower()}:{request.session_id}"


def can_own(state: InstanceState | None, model: str) -> bool:
    """Whether an instance may keep a session of `model`: present, healthy, not draining
    nor cordoned, serving the model (both drivers ask exactly this)."""
    return (state is not None and state.healthy and not state.draining and not state.cordoned
            and state.model.lower() == model.lower())


def with_owner(decision: Decision, owner: str) -> Decision:
    """`decision` with `owner` first (the rest keep their order)."""
    if decision.instance_ids and decision.instance_ids[0] == owner:
        return decision
    rest = tuple(iid for iid in decision.instance_ids if iid != owner)
    return Decision(instance_ids=(owner, *rest), priority=decision.priority,
                    reason=f"{decision.reason}+session_affinity", scores=decision.scores,
                    explanation=decision.explanation)


class AffinityTable(Protocol):
    """The synchronous table (simulated); the live store offers the same two calls, async."""

    def claim(self, key: str, instance_id: str, ttl_s: float, now_s: float) -> str:
        """The owner after the claim: `instance_id` if the key had none (or it expired)."""
        ...

    def drop(self, key: str) -> None: ...


class InMemoryAffinity:
    """A bounded in-memory table: least recently claimed keys are forgotten first."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def claim(self, key: str, instance_id: str, ttl_s: float, now_s: float) -> str:
        found = self._owners.get(key)
        if found is not None and found[1] > now_s:
            return found[0]  # a live owner wins, its lifetime unchanged (as SET NX leaves it)
        self._owners[key] = (instance_id, now_s + ttl_s)
        self._owners.move_to_end(key)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)
        return instance_id

    def drop(self, key: str) -> None:
        self._owners.pop(key, None)

    def __len__(self) -> int:
        return len(self._owners)


def resolve_affinity(
    table: AffinityTable, request: RequestInfo, decision: Decision, ttl_s: float, now_s: float,
    usable: Callable[[str], bool],
) -> Decision:
    """The claim protocol of the module docstring on a synchronous table."""
    if request.session_id is None:
        return decision
    key = affinity_key(request)
    chosen = decision.instance_id
    owner = table.claim(key, chosen, ttl_s, now_s)
    if owner != chosen and not usable(owner):
        table.drop(key)
        owner = table.claim(key, chosen, ttl_s, now_s)
    if owner == chosen or not usable(owner):
        return decision
    return with_owner(decision, owner)


def follow(table: AffinityTable, request: RequestInfo, instance_id: str, ttl_s: float, now_s: float) -> None:
    """The session's request was served by a fallback: the session moves there."""
    if request.session_id is None:
        return
    key = affinity_key(request)
    table.drop(key)
    table.claim(key, instance_id, ttl_s, now_s)
