"""Live migration in the simulator: the scheduler's migration policy, moves timed by KV bytes.

`MigrationDriver` is the simulator's counterpart of router/migration_loop.py: every
`interval_s` of simulated time it builds each instance's `MigrationLoad`, asks the
`scheduler.migration` policy for orders (the very same classes the router runs) and
carries them out on the engine cores the way the emulated engines do over gRPC:

    order at t0        the destination reserves the request's blocks (plus grow room);
                       the request keeps decoding at the source
    pre-copy stages    stage k copies the blocks that filled since stage k-1; each stage
                       lasts bytes / link bandwidth + one round trip; stages repeat while
                       more than `stop_copy_max_blocks` new blocks came, at most `max_stages`
    stop-and-copy      the source suspends the request (out of its batch, blocks kept) and
                       copies the rest (the partial last block included): the downtime
    commit             the destination adopts it from the exact token; the source frees it

A request that finishes, or is preempted, at the source before the stop-and-copy ends the
migration (the reservation is freed), as on a live engine. KV bytes per token are the
model's (scheduler/catalog.py); the link is `link_gbps` (for example 100 for an RDMA NIC,
25 for TCP between nodes).

Hooks in sim/simulator.py: `Simulation(migration=...)` makes one of these and calls
`advance(next_event_s)` at the top of its loop; the run is stepped (not fast-forwarded),
since moves change batches between iteration ends.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from scheduler.migration import MigrationCandidate, MigrationLoad, MigrationOrder, MigrationPolicy
from sim.engine_core import RequestStatus
from sim.sim_instance import SimInstance, SimRequest

if TYPE_CHECKING:
    from scheduler.policy_document import MigrationSpec


class MigrationHost(Protocol):
    """What `MigrationDriver` reads and drives of a `sim.simulator.Simulation` (named by
    shape, not imported: the simulator imports this module to make its driver)."""

    now_s: float
    instances: list[SimInstance]
    by_id: dict[str, SimInstance]

    def _start_iteration(self, inst: SimInstance, now: float) -> None: ...


class MigrationConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class MigrationSimConfig:
    """How the simulator runs migration: the policy and the link it copies KV over."""

    policy: MigrationPolicy
    interval_s: float = 0.05
    link_gbps: float = 100.0
    stage_rtt_s: float = 0.0005
    stop_copy_max_blocks: int = 2
    max_stages: int = 4
    grow_room_blocks: int = 4
    max_candidates: int = 16
    queued_demand: str = "head"  # "head": the head-of-line request's blocks; "all": every queued one

    def __post_init__(self) -> None:
        for name in ("interval_s", "link_gbps"):
            if not getattr(self, name) > 0:
                raise MigrationConfigError(f"migration.{name}: expected a positive number, got {getattr(self, name)}")
        if self.stage_rtt_s < 0 or self.max_stages < 1 or self.stop_copy_max_blocks < 0:
            raise MigrationConfigError("migration: stage_rtt_s >= 0, max_stages >= 1, stop_copy_max_blocks >= 0")

    @property
    def bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8.0


def migration_from_document(spec: MigrationSpec) -> MigrationSimConfig | None:
    """The simulator's migration from the policy document's `migration:` section (None: off),
    so that a cluster file with that document moves requests as a router with it does."""
    if not spec.active():
        return None
    return MigrationSimConfig(policy=spec.build_policy(), interval_s=spec.interval_s, link_gbps=spec.link_gbps,
                              grow_room_blocks=spec.params.grow_room_blocks)


@dataclass(slots=True, eq=False)
class _Move:
    order: MigrationOrder
    req: SimRequest
    source: SimInstance
    destination: SimInstance
    reserved_blocks: int
    started_s: float
    copied_tokens: int  # context tokens whose KV is at the destination (full blocks)
    stage: int = 0
    suspended_s: float = 0.0


@dataclass(slots=True)
class MigrationStats:
    started: int = 0
    committed: int = 0
    aborted: int = 0
    downtime_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    bytes_copied: float = 0.0

    def summary(self) -> dict[str, Any]:
        down = sorted(self.downtime_s)

        def pct(q: float) -> float:
            return down[min(len(down) - 1, int(q * len(down)))] if down else 0.0

        return {"started": self.started, "committed": self.committed, "aborted": self.aborted,
                "downtime_p50_ms": pct(0.5) * 1000, "downtime_p99_ms": pct(0.99) * 1000,
                "gib_copied": self.bytes_copied / 2**30}


class MigrationDriver:
    """Runs the migration policy on a `Simulation`'s instances (see the module docstring)."""

    def __init__(self, sim: MigrationHost, config: MigrationSimConfig) -> None:
        self.sim = sim
        self.config = config
        self.policy = config.policy
        self.next_tick_s: float | None = None
        self.events: list[tuple[float, int, str, _Move]] = []
        self.seq = 0
        self.busy: set[str] = set()  # instances in a migration
        self.stats = MigrationStats()

    # ------------------------------------------------------------ loop hook
    def advance(self, next_event_s: float) -> bool:
        """Carry out the next migration step if it comes before `next_event_s`; True if one did."""
        if self.next_tick_s is None:
            if math.isinf(next_event_s):
                return False
            self.next_tick_s = next_event_s + self.config.interval_s
        pending = self.events[0][0] if self.events else math.inf
        tick = self.next_tick_s if not math.isinf(next_event_s) or self.events else math.inf
        when = min(pending, tick)
        if when >= next_event_s or math.isinf(when):
            return False
        self.sim.now_s = max(self.sim.now_s, when)
        if pending <= tick:
            _, _, kind, move = heapq.heappop(self.events)
            if kind == "stage":
                self._stage_done(move, when)
            else:
                self._commit(move, when)
        else:
            self.next_tick_s = when + self.config.interval_s
            self._tick(when)
        return True

    def _push(self, at_s: float, kind: str, move: _Move) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at_s, self.seq, kind, move))

    # ------------------------------------------------------------ policy
    def _load(self, inst: SimInstance) -> MigrationLoad:
        core = inst.core
        head = core.waiting_blocks if self.config.queued_demand == "all" else core.head_of_line_blocks
        headroom = self.policy.headroom  # counted as the router counts an engine's report
        high = headroom.high_priority_running(core.running_by_priority) if headroom.active else 0
        return MigrationLoad(
            instance_id=inst.state.instance_id, model=inst.state.model, kv_blocks_total=core.num_kv_blocks,
            kv_blocks_used=core.kv_blocks_used, head_of_line_blocks=head, waiting=core.num_waiting,
            running=core.num_running, high_priority_running=high, draining=inst.state.draining,
            cordoned=inst.state.cordoned, migrating=inst.state.instance_id in self.busy,
        )

    def _candidates(self, instance_id: str) -> list[MigrationCandidate]:
        core = self.sim.by_id[instance_id].core
        found = [MigrationCandidate(r.request_id, r.num_tokens, r.priority, r.generated_tokens)
                 for r in core.running
                 if r.generated_tokens > 0 and r.computed_tokens == r.num_tokens - 1
                 and r.generated_tokens < r.output_tokens - 1]
        found.sort(key=lambda c: c.context_tokens)
        return found[: self.config.max_candidates]

    def _tick(self, now_s: float) -> None:
        instances = self.sim.instances
        loads = [self._load(inst) for inst in instances]
        block_size = instances[0].core.config.block_size if instances else 16
        for order in self.policy.plan(loads, self._candidates, block_size):
            self._start(order, now_s)

    # ------------------------------------------------------------ a move
    def _bytes(self, inst: SimInstance, tokens: int) -> float:
        return float(tokens * inst.pool.model.kv_bytes_per_token)

    def _start(self, order: MigrationOrder, now_s: float) -> None:
        source = self.sim.by_id[order.source_id]
        destination = self.sim.by_id[order.destination_id]
        req = source.core.requests.get(order.request_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            return
        bs = destination.core.config.block_size
        blocks = -(-(req.num_tokens + 1) // bs) + self.config.grow_room_blocks
        if not destination.core.reserve_blocks(blocks):
            return
        full_tokens = (req.computed_tokens // bs) * bs
        move = _Move(order, req, source, destination, blocks, now_s, full_tokens, stage=1)  # type: ignore[arg-type]
        self.busy.update((order.source_id, order.destination_id))
        self.stats.started += 1
        self._push(now_s + self._stage_s(source, full_tokens), "stage", move)

    def _stage_s(self, inst: SimInstance, tokens: int) -> float:
        nbytes = self._bytes(inst, tokens)
        self.stats.bytes_copied += nbytes
        return nbytes / self.config.bytes_per_s + self.config.stage_rtt_s

    def _stage_done(self, move: _Move, now_s: float) -> None:
        req = move.req
        core = move.source.core
        if req.status is not RequestStatus.RUNNING or core.requests.get(req.request_id) is not req:
            self._abort(move)  # finished, aborted or preempted at the source meanwhile
            return
        bs = core.config.block_size
        full_tokens = (req.computed_tokens // bs) * bs
        new_blocks = (full_tokens - move.copied_tokens) // bs
        if new_blocks > self.config.stop_copy_max_blocks and move.stage < self.config.max_stages:
            move.stage += 1
            self._push(now_s + self._stage_s(move.source, full_tokens - move.copied_tokens), "stage", move)
            move.copied_tokens = full_tokens
            return
        # Stop and copy: the rest of the context, the partial last block included.
        core.suspend(req.request_id)
        move.suspended_s = now_s
        rest = req.computed_tokens - move.copied_tokens
        self._push(now_s + self._stage_s(move.source, rest), "commit", move)

    def _commit(self, move: _Move, now_s: float) -> None:
        sim = self.sim
        req = move.req
        source, destination = move.source, move.destination
        source.core.release_migrated(req.request_id)
        batch = source.batch
        if batch is not None:
            # The source's step in flight must not advance the request after it has moved.
            batch.scheduled = [(r, n) for r, n in batch.scheduled if r is not req]
        destination.core.adopt(req, move.reserved_blocks)
        # The router's bookkeeping moves with the request (in-flight counts, policy state).
        source.state.router_inflight -= 1
        destination.state.router_inflight += 1
        if req.policy is not None and req.info is not None:
            req.policy.on_finish(req.info, source.state.instance_id)
            req.policy.on_dispatch(req.info, destination.state.instance_id)
        req.instance = destination
        self.stats.committed += 1
        self.stats.downtime_s.append(now_s - move.suspended_s)
        self.stats.total_s.append(now_s - move.started_s)
        self._release(move)
        for inst in (destination, source):
            if inst.batch is None and inst.core.has_work():
                sim._start_iteration(inst, now_s)

    def _abort(self, move: _Move) -> None:
        move.destination.core.unreserve_blocks(move.reserved_blocks)
        self.stats.aborted += 1
        self._release(move)
        dest = move.destination
        if dest.batch is None and dest.core.has_work():
            self.sim._start_iteration(dest, self.sim.now_s)

    def _release(self, move: _Move) -> None:
        self.busy.discard(move.order.source_id)
        self.busy.discard(move.order.destination_id)
