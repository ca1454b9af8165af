"""Migration policy: which running request moves from which instance to which (Llumnix-style).

Pure decisions, run the same way by the router's control loop (router/migration_loop.py,
which then calls the Worker migration RPCs) and by the simulator (sim/migration.py, which
models the move by its transfer time). Two steps, so that a driver asks for the running
requests of the chosen sources only:

1. `pairs(loads)`: every instance's *virtual usage* -- the KV blocks its running requests
   hold, plus the blocks its head-of-line queued request needs (queued demand: what keeps
   it from admitting), plus headroom kept free for its high-priority requests -- as a
   fraction of its blocks. Draining instances count as infinitely loaded (everything on
   them should leave before scale-down). Instances above `overload_usage` are sources,
   those below `underload_usage` destinations; the most loaded source is paired with the
   least loaded destination, and so on. An instance already in a migration (in or out)
   takes part in none: at most one migration per instance at a time.
2. `choose(source, destination, candidates)`: the request to move. Cost grows with its
   context (the bytes copied); the benefit is the KV it frees at the source. Llumnix moves
   the cheapest: lowest priority class first (high-priority requests stay put), then the
   shortest context, provided it fits at the destination with room to grow and the move
   does not make the destination more loaded than the source is after it (no ping-pong).
   Longer than `max_context_tokens`: not worth the copy.

An operator's move (`tokenyard instances migrate`) uses `pick_destination` and
`operator_choice`: the same choice, without the load thresholds.

Policies register by name (`register_migration_policy`), as dispatch parts do, and are
chosen in config: `migration: {policy: llumnix, overload_usage: 0.9, ...}`; `none` never
moves anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar


class MigrationPolicyError(ValueError):
    """Unknown migration policy or a bad parameter; the message says which and what is allowed."""


@dataclass(frozen=True, slots=True)
class MigrationLoad:
    """One instance's load as the migration policy reads it."""

    instance_id: str
    model: str
    kv_blocks_total: int
    kv_blocks_used: int  # held by running requests (and reservations)
    head_of_line_blocks: int = 0  # KV blocks the first queued request needs to be admitted
    waiting: int = 0
    running: int = 0
    high_priority_running: int = 0  # running requests of a priority class that keeps headroom
    draining: bool = False
    migrating: bool = False  # a migration in or out is in flight
    cordoned: bool = False  # takes no new work, so no request moves in (its own stay put)


@dataclass(frozen=True, slots=True)
class MigrationCandidate:
    """A running, decoding request an instance could move out."""

    request_id: str
    context_tokens: int
    priority: int = 0
    tokens_generated: int = 0


@dataclass(frozen=True, slots=True)
class MigrationPair:
    source_id: str
    destination_id: str
    reason: str  # "load" or "drain"


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    """Move `request_id` from `source_id` to `destination_id`."""

    request_id: str
    source_id: str
    destination_id: str
    reason: str
    context_tokens: int


class MigrationPolicy:
    """Chooses pairs of instances, then a request for each pair."""

    name: ClassVar[str] = ""

    def pairs(self, loads: Sequence[MigrationLoad]) -> list[MigrationPair]:
        raise NotImplementedError

    def choose(self, source: MigrationLoad, destination: MigrationLoad,
               candidates: Sequence[MigrationCandidate], block_size_tokens: int) -> MigrationCandidate | None:
        raise NotImplementedError

    def plan(self, loads: Sequence[MigrationLoad], candidates_of: Callable[[str], Sequence[MigrationCandidate]],
             block_size_tokens: int) -> list[MigrationOrder]:
        """Both steps: at most one order per instance."""
        by_id = {load.instance_id: load for load in loads}
        orders: list[MigrationOrder] = []
        for pair in self.pairs(loads):
            source, destination = by_id[pair.source_id], by_id[pair.destination_id]
            chosen = self.choose(source, destination, candidates_of(pair.source_id), block_size_tokens)
            if chosen is not None:
                orders.append(MigrationOrder(chosen.request_id, pair.source_id, pair.destination_id, pair.reason,
                                             chosen.context_tokens))
        return orders


MIGRATION_POLICIES: dict[str, type[MigrationPolicy]] = {}
_M = TypeVar("_M", bound=type[MigrationPolicy])


def register_migration_policy(name: str) -> Callable[[_M], _M]:
    def wrap(cls: _M) -> _M:
        cls.name = name
        MIGRATION_POLICIES[name] = cls
        return cls

    return wrap


@register_migration_policy("none")
class NoMigration(MigrationPolicy):
    """Never moves a request."""

    def pairs(self, loads: Sequence[MigrationLoad]) -> list[MigrationPair]:
        return []

    def choose(self, source: MigrationLoad, destination: MigrationLoad,
               candidates: Sequence[MigrationCandidate], block_size_tokens: int) -> MigrationCandidate | None:
        return None


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 10.0:
        raise MigrationPolicyError(f"migration.{name}: expected a number in [0, 10], got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MigrationPolicyError(f"migration.{name}: expected an integer >= 0, got {value!r}")
    return value


@register_migration_policy("llumnix")
class VirtualUsageBalance(MigrationPolicy):
    """Llumnix's load balancing and draining by virtual usage (see the module docstring)."""

    def __init__(self, overload_usage: float = 0.9, underload_usage: float = 0.6,
                 priority_headroom_blocks: int = 0, high_priority_below: int = 0,
                 max_context_tokens: int = 32_768, grow_room_blocks: int = 4) -> None:
        self.overload_usage = _fraction("overload_usage", overload_usage)
        self.underload_usage = _fraction("underload_usage", underload_usage)
        if self.underload_usage >= self.overload_usage:
            raise MigrationPolicyError(
                f"migration: underload_usage ({underload_usage}) must be below overload_usage ({overload_usage})")
        self.priority_headroom_blocks = _count("priority_headroom_blocks", priority_headroom_blocks)
        if isinstance(high_priority_below, bool) or not isinstance(high_priority_below, int):
            raise MigrationPolicyError(f"migration.high_priority_below: expected an integer, got {high_priority_below!r}")
        self.high_priority_below = high_priority_below
        self.max_context_tokens = _count("max_context_tokens", max_context_tokens)
        self.grow_room_blocks = _count("grow_room_blocks", grow_room_blocks)

    def virtual_usage(self, load: MigrationLoad) -> float:
        """Virtual KV usage as a fraction of the instance's blocks (inf when draining)."""
        if load.draining:
            return math.inf
        virtual = (load.kv_blocks_used + load.head_of_line_blocks
                   + self.priority_headroom_blocks * load.high_priority_running)
        return virtual / max(1, load.kv_blocks_total)

    def pairs(self, loads: Sequence[MigrationLoad]) -> list[MigrationPair]:
        usage = {load.instance_id: self.virtual_usage(load) for load in loads}
        by_model: dict[str, list[MigrationLoad]] = {}
        for load in loads:
            if not load.migrating:
                by_model.setdefault(load.model, []).append(load)
        found: list[MigrationPair] = []
        for group in by_model.values():
            # A source must also hold much KV itself: one overloaded only by its queue, with
            # little KV in use, frees nothing by moving out (and, emptied, would attract the
            # dispatcher's next arrivals and be drained again, in a loop).
            sources = sorted((g for g in group if usage[g.instance_id] >= self.overload_usage and g.running > 0
                              and (g.draining or g.kv_blocks_used > self.underload_usage * g.kv_blocks_total)),
                             key=lambda g: (-usage[g.instance_id], g.instance_id))
            destinations = sorted((g for g in group if usage[g.instance_id] <= self.underload_usage
                                   and not g.cordoned),
                                  key=lambda g: (usage[g.instance_id], g.instance_id))
            for source, destination in zip(sources, destinations, strict=False):
                reason = "drain" if source.draining else "load"
                found.append(MigrationPair(source.instance_id, destination.instance_id, reason))
        return found

    def choose(self, source: MigrationLoad, destination: MigrationLoad,
               candidates: Sequence[MigrationCandidate], block_size_tokens: int) -> MigrationCandidate | None:
        bs = max(1, block_size_tokens)
        free_at_destination = destination.kv_blocks_total - destination.kv_blocks_used
        source_usage = self.virtual_usage(source)
        destination_total = max(1, destination.kv_blocks_total)
        # Blocks the source must free before its head-of-line request fits: a move that frees
        # that many helps at once, so the cheapest such move wins over merely cheap ones.
        unblock = source.head_of_line_blocks - (source.kv_blocks_total - source.kv_blocks_used)
        best: MigrationCandidate | None = None
        best_key: tuple[int, int, int] | None = None
        for cand in candidates:
            if self.max_context_tokens and cand.context_tokens > self.max_context_tokens and not source.draining:
                continue
            if cand.priority < self.high_priority_below and not source.draining:
                continue  # high-priority requests are not disturbed to balance load
            blocks = -(-cand.context_tokens // bs)
            if blocks + self.grow_room_blocks > free_at_destination:
                continue
            if not source.draining:
                after_source = source_usage - blocks / max(1, source.kv_blocks_total)
                after_destination = (destination.kv_blocks_used + destination.head_of_line_blocks + blocks) \
                    / destination_total
                if after_destination >= after_source:
                    continue  # the move would only turn the imbalance around
            # Lowest priority class (largest value) first; then a move that unblocks the
            # queue over one that does not; then the cheapest (shortest context).
            key = (-cand.priority, 0 if unblock <= 0 or blocks >= unblock else 1, cand.context_tokens)
            if best_key is None or key < best_key:
                best, best_key = cand, key
        return best


def pick_destination(source: MigrationLoad, loads: Sequence[MigrationLoad]) -> MigrationLoad | None:
    """Where an operator's move off `source` goes when they name no destination: the
    instance of the source's model with the lowest KV usage that takes new work (neither
    draining, cordoned nor in a move); ties by id. None when there is none."""
    fits = [load for load in loads if load.instance_id != source.instance_id and load.model == source.model
            and not (load.draining or load.cordoned or load.migrating)]
    return min(fits, key=lambda load: (load.kv_blocks_used / max(1, load.kv_blocks_total), load.instance_id),
               default=None)


def operator_choice(policy: MigrationPolicy, source: MigrationLoad, destination: MigrationLoad,
                    candidates: Sequence[MigrationCandidate], block_size_tokens: int,
                    request_id: str = "") -> MigrationCandidate | None:
    """The request an operator's move takes: the one they named (None when it is not among
    the candidates), else the policy's choice with the source treated as draining: the
    operator asked for a move, so the balance checks that keep the loop from ping-ponging do
    not veto it, while the fit at the destination and the priority order still hold."""
    if request_id:
        return next((c for c in candidates if c.request_id == request_id), None)
    return policy.choose(replace(source, draining=True), destination, candidates, block_size_tokens)


def build_migration_policy(config: Mapping[str, Any] | None, where: str = "migration") -> MigrationPolicy:
    """The policy a `migration:` config section names (`none` when absent)."""
    if config is None:
        return NoMigration()
    if not isinstance(config, Mapping):
        raise MigrationPolicyError(f"{where}: expected a mapping like {{policy: llumnix}}, got {config!r}")
    params = dict(config)
    name = params.pop("policy", "llumnix")
    cls = MIGRATION_POLICIES.get(str(name))
    if cls is None:
        raise MigrationPolicyError(f"{where}.policy: unknown {name!r}; expected one of {sorted(MIGRATION_POLICIES)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise MigrationPolicyError(f"{where}: {exc}") from None
