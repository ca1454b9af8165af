"""Migration policy: which running request moves from which instance to which (Llumnix-style).

Pure decisions, run the same way by the router's control loop (router/migration_loop.py,
which then calls the Worker migration RPCs) and by the simulator (sim/migration.py, which
models the move by its transfer time). Two steps, so that a driver asks for the running
requests of the chosen sources only:

1. `sources(loads)`: a *source* is an instance with a *deficit*: the blocks it must free
   before its head-of-line request is admitted with the *guard* left for its running
   decodes (the head among them) to grow into: `guard_blocks_per_decode` (1) per decode,
   at least `preempt_guard_blocks` (admitting a head that leaves less only trades a wait
   for preemptions: a batch of n decodes needs about n / block_size new blocks a step),
   plus headroom kept for its high-priority requests (`headroom`: the one definition in
   scheduler/priority_headroom.py, which dispatch's `least_virtual_usage` counts too,
   drivers counting `high_priority_running` from each instance's reported
   `running_by_priority`); with nothing queued, the blocks
   its decodes lack to keep that guard (the engine would soon preempt one and recompute
   its whole context later). A draining instance is a source while anything runs on it
   (everything leaves before scale-down); a cordoned one keeps its requests. Sources go
   by decreasing deficit, drains first.
2. `assign(loads, candidates)`: a *destination* takes part in no other move, is neither
   cordoned nor draining, and has *room*: free blocks after admitting its own queue head,
   keeping max(`destination_reserve_blocks`, its guard with the mover and its head
   counted) and the mover's grow room free (so it becomes no source by what it takes in). Each source, in order, takes
   the first free destination, most room first, for which `choose` finds a request: one
   that fits the room, of the lowest priority class (high-priority requests stay put),
   then the fewest blocks among those that free the whole deficit (the cheapest copy
   that admits the head at once), else the most blocks (the next round moves another).
   Longer than `max_context_tokens`: not worth the copy. Draining moves take the cheapest
   that fits. `min_usage_gap` (0 by default) can also require the destination's virtual
   usage (KV held plus the head's blocks, over all blocks) to be that much lower. An
   instance already in a migration (in or out) takes part in none: at most one migration
   per instance at a time. `pairs` is the first destination each source would try.

The router lists the sources' running requests over gRPC between the two steps; the
simulator's `plan` runs both at once.

Why not balance a usage measure, as the first version did (`overload_usage` /
`underload_usage`): in the simulator, tails came from heads blocked on KV while a peer had
room; moving requests between thresholds relieved no blocked head and lost to plain
least-load dispatch (docs/benchmarks.md, "Live migration"). Documents that still name the
two retired parameters are refused with this hint (`RETIRED_PARAMS`).

An operator's move (`tokenyard instances migrate`) uses `pick_destination` and
`operator_choice`: the same choice, without the load thresholds.

Policies register by name (`register_migration_policy`), as dispatch parts do, and are
chosen in config: `migration: {policy: llumnix, preempt_guard_blocks: 8, ...}`; `none` never
moves anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

from scheduler.priority_headroom import NO_HEADROOM, PriorityHeadroom, PriorityHeadroomError


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
    # Running requests of a priority class that keeps headroom (the policy's `headroom`
    # counts them from the instance's `running_by_priority`).
    high_priority_running: int = 0
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
    # What the policy's load measure keeps free for high-priority requests; drivers count
    # `MigrationLoad.high_priority_running` with it (`headroom.high_priority_running`).
    headroom: PriorityHeadroom = NO_HEADROOM

    def pairs(self, loads: Sequence[MigrationLoad]) -> list[MigrationPair]:
        raise NotImplementedError

    def choose(self, source: MigrationLoad, destination: MigrationLoad,
               candidates: Sequence[MigrationCandidate], block_size_tokens: int) -> MigrationCandidate | None:
        raise NotImplementedError

    def sources(self, loads: Sequence[MigrationLoad]) -> list[str]:
        """The instances whose running requests a driver should list (step 1)."""
        return [pair.source_id for pair in self.pairs(loads)]

    def assign(self, loads: Sequence[MigrationLoad], candidates: Mapping[str, Sequence[MigrationCandidate]],
               block_size_tokens: int) -> list[MigrationOrder]:
        """The orders (step 2), given the candidates of the `sources`: at most one per instance."""
        by_id = {load.instance_id: load for load in loads}
        orders: list[MigrationOrder] = []
        for pair in self.pairs(loads):
            source, destination = by_id[pair.source_id], by_id[pair.destination_id]
            chosen = self.choose(source, destination, candidates.get(pair.source_id, ()), block_size_tokens)
            if chosen is not None:
                orders.append(MigrationOrder(chosen.request_id, pair.source_id, pair.destination_id, pair.reason,
                                             chosen.context_tokens))
        return orders

    def plan(self, loads: Sequence[MigrationLoad], candidates_of: Callable[[str], Sequence[MigrationCandidate]],
             block_size_tokens: int) -> list[MigrationOrder]:
        """Both steps, for a driver that lists candidates synchronously (the simulator)."""
        return self.assign(loads, {iid: candidates_of(iid) for iid in self.sources(loads)}, block_size_tokens)


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


# Parameters of the usage-balancing policy this one replaced (issue 13): it balanced a
# usage measure between thresholds, which moved requests without admitting anyone, so a
# document that still sets them is refused with what to write instead.
RETIRED_PARAMS = {
    "overload_usage": "sources are now instances whose queue head cannot be admitted (see preempt_guard_blocks)",
    "underload_usage": "destinations are now instances that keep destination_reserve_blocks free after the move",
}


@register_migration_policy("llumnix")
class BlockedHeadRelief(MigrationPolicy):
    """Moves a running request off an instance whose queue head is blocked on KV blocks,
    or whose decodes are about to be preempted for lack of them, to an instance with room
    to spare (module docstring)."""

    def __init__(self, preempt_guard_blocks: int = 8, destination_reserve_blocks: int = 16,
                 min_usage_gap: float = 0.0, priority_headroom_blocks: int = 0, high_priority_below: int = 0,
                 max_context_tokens: int = 32_768, grow_room_blocks: int = 4, guard_blocks_per_decode: float = 1.0,
                 **retired: Any) -> None:
        for name in retired:
            hint = RETIRED_PARAMS.get(name)
            if hint is None:
                raise MigrationPolicyError(f"migration: unexpected keyword argument {name!r}")
            raise MigrationPolicyError(
                f"migration.{name}: no longer a parameter of the llumnix policy: {hint}; set preempt_guard_blocks, "
                f"destination_reserve_blocks and min_usage_gap instead (docs/migration.md)")
        self.preempt_guard_blocks = _count("preempt_guard_blocks", preempt_guard_blocks)
        self.destination_reserve_blocks = _count("destination_reserve_blocks", destination_reserve_blocks)
        self.min_usage_gap = _fraction("min_usage_gap", min_usage_gap)
        try:
            self.headroom = PriorityHeadroom(priority_headroom_blocks, high_priority_below)
        except PriorityHeadroomError as exc:
            raise MigrationPolicyError(f"migration.{exc}") from None
        self.priority_headroom_blocks = priority_headroom_blocks
        self.high_priority_below = high_priority_below
        self.max_context_tokens = _count("max_context_tokens", max_context_tokens)
        self.grow_room_blocks = _count("grow_room_blocks", grow_room_blocks)
        self.guard_blocks_per_decode = _fraction("guard_blocks_per_decode", guard_blocks_per_decode)

    # ------------------------------------------------------------ measures
    def virtual_usage(self, load: MigrationLoad) -> float:
        """Virtual KV usage as a fraction of the instance's blocks (inf when draining)."""
        if load.draining:
            return math.inf
        virtual = load.kv_blocks_used + load.head_of_line_blocks + self.headroom.blocks(load.high_priority_running)
        return virtual / max(1, load.kv_blocks_total)

    def guard_blocks(self, load: MigrationLoad, more_running: int = 0) -> int:
        """Free blocks the instance keeps for its running decodes (and `more_running` to
        come) to grow into: `guard_blocks_per_decode` each, at least `preempt_guard_blocks`.
        Why per decode: each crosses into a new block every block_size tokens, so a batch
        of n needs about n / block_size blocks a step; a flat guard lasts one step of a
        full batch, and a head admitted into it soon preempts a decode (vLLM V1 admits
        into the last free block), whose whole context is recomputed: on top of least-
        virtual-usage dispatch a flat 8 took preemptions from 82 to 312 and p99 TTFT from
        6.6 to 10.3 s (issue 13, docs/benchmarks.md). One block each lasts block_size
        steps, many of the policy's rounds."""
        per_decode = math.ceil(self.guard_blocks_per_decode * max(0, load.running + more_running) - 1e-9)
        return max(self.preempt_guard_blocks, per_decode)

    def deficit_blocks(self, load: MigrationLoad) -> int:
        """Blocks the instance must free before its queue head is admitted with the guard
        (`guard_blocks`, the head counted among the decodes) left for its decodes to grow
        into; with nothing queued, before its decodes have that guard (fewer free blocks
        and the engine soon preempts one, recomputing its whole context later). 0: nothing
        is blocked."""
        head = load.head_of_line_blocks if load.waiting > 0 else 0
        if head <= 0 and load.running <= 0:
            return 0
        free = load.kv_blocks_total - load.kv_blocks_used
        need = head + self.guard_blocks(load, 1 if head > 0 else 0) + self.headroom.blocks(load.high_priority_running)
        return max(0, need - free)

    def room_blocks(self, load: MigrationLoad) -> int:
        """Blocks the instance can take in and still admit its own queue head and keep
        `destination_reserve_blocks` (and the mover's grow room) free."""
        free = load.kv_blocks_total - load.kv_blocks_used
        own = load.head_of_line_blocks if load.waiting > 0 else 0
        # Never below the guard its decodes, the mover and its own head will need: a
        # destination must not become a source by what it takes in.
        guard = self.guard_blocks(load, 1 + (1 if own > 0 else 0))
        reserve = max(self.destination_reserve_blocks, guard)
        return free - own - reserve - self.grow_room_blocks

    # ------------------------------------------------------------ steps
    def _ranked(self, loads: Sequence[MigrationLoad]) -> list[tuple[list[MigrationLoad], list[MigrationLoad]]]:
        """Per model: its sources (drains first, then by decreasing deficit) and its
        destinations (by decreasing room)."""
        by_model: dict[str, list[MigrationLoad]] = {}
        for load in loads:
            if not load.migrating:
                by_model.setdefault(load.model, []).append(load)
        ranked = []
        for group in by_model.values():
            deficit = {g.instance_id: self.deficit_blocks(g) for g in group}
            room = {g.instance_id: self.room_blocks(g) for g in group}
            # A cordoned instance keeps its own requests (cordon is not drain).
            sources = sorted((g for g in group if g.running > 0
                              and (g.draining or (deficit[g.instance_id] > 0 and not g.cordoned))),
                             key=lambda g: (not g.draining, -deficit[g.instance_id], g.instance_id))
            taken = {g.instance_id for g in sources}
            destinations = sorted((g for g in group if not (g.cordoned or g.draining) and room[g.instance_id] > 0
                                   and g.instance_id not in taken),
                                  key=lambda g: (-room[g.instance_id], g.instance_id))
            ranked.append((sources, destinations))
        return ranked

    def _apart(self, source: MigrationLoad, destination: MigrationLoad) -> bool:
        # Optionally, the destination must be clearly less loaded (`min_usage_gap`); the
        # room check alone already keeps it from being blocked by what it takes in.
        return source.draining or self.virtual_usage(source) - self.virtual_usage(destination) >= self.min_usage_gap

    def pairs(self, loads: Sequence[MigrationLoad]) -> list[MigrationPair]:
        """Each source with the first destination `assign` would try for it."""
        found: list[MigrationPair] = []
        for sources, destinations in self._ranked(loads):
            for source in sources:
                destination = next((d for d in destinations if self._apart(source, d)), None)
                if destination is not None:
                    destinations.remove(destination)
                    found.append(MigrationPair(source.instance_id, destination.instance_id,
                                               "drain" if source.draining else "load"))
        return found

    def sources(self, loads: Sequence[MigrationLoad]) -> list[str]:
        return [source.instance_id for sources, destinations in self._ranked(loads) if destinations
                for source in sources]

    def assign(self, loads: Sequence[MigrationLoad], candidates: Mapping[str, Sequence[MigrationCandidate]],
               block_size_tokens: int) -> list[MigrationOrder]:
        """Each source, in order, takes the first free destination (most room first) for
        which `choose` finds a request: a destination with room too small for any of this
        source's requests may still suit the next source."""
        orders: list[MigrationOrder] = []
        for sources, destinations in self._ranked(loads):
            for source in sources:
                cands = candidates.get(source.instance_id, ())
                for destination in destinations:
                    if not self._apart(source, destination):
                        continue
                    chosen = self.choose(source, destination, cands, block_size_tokens)
                    if chosen is not None:
                        destinations.remove(destination)
                        orders.append(MigrationOrder(chosen.request_id, source.instance_id,
                                                     destination.instance_id,
                                                     "drain" if source.draining else "load", chosen.context_tokens))
                        break
        return orders

    def choose(self, source: MigrationLoad, destination: MigrationLoad,
               candidates: Sequence[MigrationCandidate], block_size_tokens: int) -> MigrationCandidate | None:
        bs = max(1, block_size_tokens)
        room = self.room_blocks(destination)
        if source.draining:
            # Everything leaves: the cheapest that fits, whatever its priority or length.
            room = destination.kv_blocks_total - destination.kv_blocks_used - self.grow_room_blocks
        deficit = self.deficit_blocks(source)
        best: MigrationCandidate | None = None
        best_key: tuple[int, int] | None = None
        for cand in candidates:
            if not source.draining:
                if self.max_context_tokens and cand.context_tokens > self.max_context_tokens:
                    continue
                if cand.priority < self.high_priority_below:
                    continue  # high-priority requests are not disturbed to make room
            blocks = -(-cand.context_tokens // bs)
            if blocks > room:
                continue
            # Lowest priority class (largest value) first; then a move that admits the head
            # (the fewest blocks copied among those); else, when no single request frees the
            # whole deficit, the one that frees the most (the next tick moves another).
            covers = source.draining or blocks >= deficit
            key = (-cand.priority, blocks if covers else 1_000_000_000 - blocks)
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
