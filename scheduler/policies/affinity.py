"""Affinity pickers: send related requests to the same instance so its KV cache is reused.

- `session_affinity`: a consistent-hash ring over instance ids, keyed by the session id,
  with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): walk the ring from the
  session's point to the first instance whose load is within `load_factor` of the mean
  (plus `slack_requests`).
  Instances joining or leaving move only the sessions next to them on the ring.
- `prefix_affinity`: an approximate, LRU-bounded table of which instances recently
  received which prefix-block hashes; the instance holding the longest leading run of the
  request's blocks wins, unless it is over the bounded load; ties and misses fall back to
  the scorers' order (e.g. least outstanding).

Both keep their tables in the picker (per router replica, rebuilt from traffic), and
requests without a session id / prefix hashes get the plain score order.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections import OrderedDict

from scheduler.dispatch_parts import DispatchContext, Picker, PolicyConfigError, register_picker
from scheduler.policies.spread import by_score
from scheduler.types import InstanceState, RequestInfo


def stable_hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's str hash is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def bounded_load_capacity(instances: list[InstanceState], load_factor: float, slack_requests: int) -> int:
    """Most outstanding requests an instance may hold, this one included, to stay preferred:
    ceil(load_factor x mean load after placing the request), plus a few requests of slack so
    that a nearly idle cluster (mean ~ 1) does not scatter every session."""
    total = sum(inst.outstanding for inst in instances) + 1
    return math.ceil(load_factor * total / len(instances)) + slack_requests


def _check_load_factor(load_factor: float, name: str) -> float:
    if isinstance(load_factor, bool) or not isinstance(load_factor, int | float) or load_factor < 1.0:
        raise PolicyConfigError(f"{name}.load_factor: expected a number >= 1, got {load_factor!r}")
    return float(load_factor)


def _check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


class _Ring:
    """Consistent-hash ring: `virtual_nodes` points per instance id."""

    __slots__ = ("points", "owners")

    def __init__(self, instance_ids: tuple[str, ...], virtual_nodes: int) -> None:
        pairs = sorted(
            (stable_hash64(f"{instance_id}#{v}"), instance_id)
            for instance_id in instance_ids
            for v in range(virtual_nodes)
        )
        self.points = [point for point, _ in pairs]
        self.owners = [owner for _, owner in pairs]

    def walk(self, key: int) -> list[str]:
        """Distinct instance ids clockwise from `key`."""
        start = bisect_left(self.points, key)
        seen: dict[str, None] = {}
        owners = self.owners
        n = len(owners)
        for k in range(n):
            owner = owners[(start + k) % n]
            if owner not in seen:
                seen[owner] = None
        return list(seen)


@register_picker("session_affinity")
class SessionAffinity(Picker):
    """Same session, same instance (consistent hash with bounded loads); see module doc."""

    _MAX_RINGS = 16

    reads_progress = False

    def __init__(self, virtual_nodes: int = 64, load_factor: float = 1.25, slack_requests: int = 2) -> None:
        self.virtual_nodes = _check_positive_int(virtual_nodes, "session_affinity.virtual_nodes")
        self.load_factor = _check_load_factor(load_factor, "session_affinity")
        self.slack_requests = _check_positive_int(slack_requests, "session_affinity.slack_requests", 0)
        self._rings: dict[tuple[str, ...], _Ring] = {}

    def _ring(self, instance_ids: tuple[str, ...]) -> _Ring:
        ring = self._rings.get(instance_ids)
        if ring is None:
            if len(self._rings) >= self._MAX_RINGS:
                self._rings.clear()
            ring = self._rings[instance_ids] = _Ring(instance_ids, self.virtual_nodes)
        return ring

    def order(
        self, request: RequestInfo, scored: list[tuple[InstanceState, float]], ctx: DispatchContext
    ) -> list[InstanceState]:
        if request.session_id is None or len(scored) == 1:
            return by_score(scored)
        by_id = {inst.instance_id: inst for inst, _ in scored}
        ring = self._ring(tuple(sorted(by_id)))
        walked = [by_id[i] for i in ring.walk(stable_hash64(request.session_id))]
        capacity = bounded_load_capacity(walked, self.load_factor, self.slack_requests)
        within = [inst for inst in walked if inst.outstanding + 1 <= capacity]
        over = [inst for inst in walked if inst.outstanding + 1 > capacity]
        return within + over


@register_picker("prefix_affinity")
class PrefixAffinity(Picker):
    """Longest matching run of leading prefix blocks wins, within bounded load; see module doc.

    capacity_blocks: prefix-block hashes remembered (least recently dispatched forgotten).
    owners_per_block: instances remembered per hash (the most recent ones).
    min_match_blocks: shorter matches count as no match.
    load_factor, slack_requests: an instance above ceil(load_factor x mean) + slack_requests
        outstanding requests loses its match (bounded load).
    """

    reads_progress = False

    def __init__(
        self,
        capacity_blocks: int = 200_000,
        owners_per_block: int = 4,
        load_factor: float = 1.5,
        min_match_blocks: int = 1,
        slack_requests: int = 2,
    ) -> None:
        self.capacity_blocks = _check_positive_int(capacity_blocks, "prefix_affinity.capacity_blocks")
        self.owners_per_block = _check_positive_int(owners_per_block, "prefix_affinity.owners_per_block")
        self.load_factor = _check_load_factor(load_factor, "prefix_affinity")
        self.min_match_blocks = _check_positive_int(min_match_blocks, "prefix_affinity.min_match_blocks")
        self.slack_requests = _check_positive_int(slack_requests, "prefix_affinity.slack_requests", 0)
        self._table: OrderedDict[int, dict[str, None]] = OrderedDict()

    def matched_blocks(self, prefix_hashes: tuple[int, ...], instance_ids: list[str]) -> dict[str, int]:
        """For each instance, how many leading blocks of the prompt it recently received."""
        matched = dict.fromkeys(instance_ids, 0)
        alive = set(instance_ids)
        for depth, block in enumerate(prefix_hashes, start=1):
            owners = self._table.get(block)
            if not owners:
                break
            alive = {i for i in alive if i in owners}
            if not alive:
                break
            for instance_id in alive:
                matched[instance_id] = depth
        return matched

    def order(
        self, request: RequestInfo, scored: list[tuple[InstanceState, float]], ctx: DispatchContext
    ) -> list[InstanceState]:
        if not request.prefix_hashes or len(scored) == 1:
            return by_score(scored)
        instances = [inst for inst, _ in scored]
        matched = self.matched_blocks(request.prefix_hashes, [inst.instance_id for inst in instances])
        capacity = bounded_load_capacity(instances, self.load_factor, self.slack_requests)

        def preference(pair: tuple[InstanceState, float]) -> tuple[int, float, str]:
            inst, score = pair
            blocks = matched[inst.instance_id]
            if blocks < self.min_match_blocks or inst.outstanding + 1 > capacity:
                blocks = 0
            return (-blocks, -score, inst.instance_id)

        return [inst for inst, _ in sorted(scored, key=preference)]

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        table = self._table
        for block in request.prefix_hashes:
            owners = table.get(block)
            if owners is None:
                table[block] = {instance_id: None}
            else:
                owners.pop(instance_id, None)
                owners[instance_id] = None  # most recent last
                if len(owners) > self.owners_per_block:
                    del owners[next(iter(owners))]
                table.move_to_end(block)
        while len(table) > self.capacity_blocks:
            table.popitem(last=False)
