"""The router's migration control loop: the scheduler's migration policy, run live.

Every `interval_s` it reads the load views the router already keeps (the registry's
`InstanceState`s, fed by /metrics scrapes or Worker Status streams), turns each instance
into a `scheduler.migration.MigrationLoad`, asks the policy which instances are sources,
fetches their running requests (`ListMigrations` with candidates, in parallel), lets the
policy assign each a request and a destination (`assign`, as the simulator's `plan` does),
and orders the move with `MigrateOut` on the source (router/worker_client.py). The
source drives the copy (proto/tokenyard/v1/worker.proto); the client's stream follows the
move in router/splice.py. An instance takes part in at most one move at a time (the
policy sees it as `migrating`), and the loop never waits on a move: each runs in its own
task, bounded by the MigrateOut deadline.

Draining before scale-down: an instance marked draining (Admin DrainInstance, or the
engine's own flag) is a source while anything runs on it, so its running requests are
moved to the instances of its model with the most room, one at a time, until it is empty.

Instances without a Worker gRPC address cannot be moved from or to (a plain vLLM without
the sidecar of docs/migration.md) and are left out. A cordoned instance takes no move in.

An operator's move (Admin TriggerMigration, `tokenyard instances migrate`) goes through
`trigger`: the same busy set (one move per instance), the same client and metrics
(reason "operator"), the destination and request chosen by scheduler/migration.py unless
named; it waits for the end of the move, which a cancelled caller does not abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from router.worker_client import MigrationClient
from scheduler.migration import (
    MigrationCandidate,
    MigrationLoad,
    MigrationOrder,
    MigrationPolicy,
    operator_choice,
    pick_destination,
)
from scheduler.priority_headroom import PriorityHeadroom
from scheduler.types import InstanceState
from tokenyard.v1 import worker_pb2

if TYPE_CHECKING:
    from router.metrics import RouterMetrics
    from scheduler.policy_document import MigrationSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoopStats:
    ticks: int = 0
    ordered: int = 0
    committed: int = 0
    aborted: int = 0
    errors: int = 0
    last_orders: list[MigrationOrder] = field(default_factory=list)


class MigrationRefused(Exception):
    """An operator's move that cannot start; `missing` says the instance or request is unknown
    (else a precondition failed). The message says what to do."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True, slots=True)
class MoveOutcome:
    order: MigrationOrder
    migration_id: str
    final: worker_pb2.MigrationProgress
    duration_s: float


MAX_OPERATOR_CANDIDATES = 256  # a named request is looked for among this many running ones


def load_of(state: InstanceState, *, draining: bool, migrating: bool, headroom: PriorityHeadroom) -> MigrationLoad:
    """An instance's migration load from what the router knows of it. The head-of-line
    demand is estimated as one average running request's blocks when requests wait (the
    Worker status has no per-request queue), bounded by the whole queued demand when the
    engine reports it (`kv_blocks_queued`; exact with one request waiting). High-priority
    running requests are counted by the policy's `headroom` from the engine's
    `running_by_priority` (none when it does not report them)."""
    bs = max(1, state.block_size_tokens)
    head = 0
    if state.waiting > 0:
        per_request = state.tokens_in_flight / max(1, state.running) if state.running else bs
        head = -(-int(per_request) // bs)
        queued = state.kv_blocks_queued  # reported by the Worker status: the head needs no more
        if queued is not None:
            head = queued if state.waiting == 1 else min(head, queued)
    return MigrationLoad(
        instance_id=state.instance_id, model=state.model, kv_blocks_total=state.kv_blocks_total,
        kv_blocks_used=state.kv_blocks_used, head_of_line_blocks=head, waiting=state.waiting,
        running=state.running, high_priority_running=headroom.high_priority_running(state.running_by_priority),
        draining=draining or state.draining, migrating=migrating, cordoned=state.cordoned)


class MigrationLoop:
    """Runs a migration policy over a router's registry (see the module docstring)."""

    def __init__(self, registry: Any, policy: MigrationPolicy, *, interval_s: float = 0.5,
                 client: MigrationClient | None = None, max_candidates: int = 16,
                 metrics: RouterMetrics | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"migration interval_s: expected a positive number, got {interval_s}")
        self.registry = registry
        self.policy = policy
        self.interval_s = interval_s
        self.client = client or MigrationClient()
        self.max_candidates = max_candidates
        self.metrics = metrics  # tokenyard_router_migrations{reason,outcome}
        self.busy: set[str] = set()
        self.stats = LoopStats()
        self._moves: set[asyncio.Task[MoveOutcome]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="migration-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.wait_moves()
        await self.client.close()

    async def wait_moves(self) -> None:
        """Wait for the moves ordered so far to end."""
        while self._moves:
            await asyncio.gather(*list(self._moves), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop the loop
                self.stats.errors += 1
                log.exception("migration tick failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> list[MigrationOrder]:
        """One round: decide and order the moves (not waiting for them); the orders."""
        self.stats.ticks += 1
        records = {r.instance_id: r for r in self.registry.records() if r.grpc_address}
        loads = [load_of(state, draining=records[state.instance_id].draining,
                         migrating=state.instance_id in self.busy, headroom=self.policy.headroom)
                 for state in self.registry.instances() if state.instance_id in records and state.healthy]
        # Step 1: the policy names the sources; their running requests are listed (in
        # parallel); step 2: the policy assigns each a request and a destination.
        sources = self.policy.sources(loads)
        listed = await asyncio.gather(*(self.client.candidates(records[iid].grpc_address or "", self.max_candidates)
                                        for iid in sources), return_exceptions=True)
        candidates: dict[str, list[MigrationCandidate]] = {}
        for iid, found in zip(sources, listed, strict=True):
            if isinstance(found, grpc.aio.AioRpcError):
                log.info("no migration candidates", extra={"instance": iid, "error": found.code().name})
                continue
            if isinstance(found, BaseException):
                raise found
            candidates[iid] = [MigrationCandidate(c.request_id, c.context_tokens, c.priority, c.tokens_generated)
                               for c in found]
        block_size = next((s.block_size_tokens for s in self.registry.instances() if s.instance_id in candidates), 16)
        orders = self.policy.assign(loads, candidates, block_size)
        for order in orders:
            self._order(order, records[order.source_id].grpc_address or "",
                        records[order.destination_id].grpc_address or "")
        self.stats.last_orders = orders
        return orders

    def _count(self, reason: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.migrations, reason, outcome).inc()

    def _order(self, order: MigrationOrder, source_address: str, destination_address: str
               ) -> asyncio.Task[MoveOutcome]:
        self.busy.update((order.source_id, order.destination_id))
        self.stats.ordered += 1
        self._count(order.reason, "started")
        request = worker_pb2.MigrateOutRequest(
            migration_id=uuid.uuid4().hex, request_id=order.request_id,
            destination_instance_id=order.destination_id, destination_address=destination_address)
        task = asyncio.create_task(self._move(order, source_address, request))
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)
        return task

    async def trigger(self, source_id: str, destination_id: str = "", request_id: str = "") -> MoveOutcome:
        """An operator's move (see the module docstring); MigrationRefused when it cannot start."""
        records = {r.instance_id: r for r in self.registry.records()}
        states = {s.instance_id: s for s in self.registry.instances()}
        source = _movable(records, states, source_id, "source")
        if destination_id:
            if destination_id == source_id:
                raise MigrationRefused(f"destination {destination_id!r} is the source; name another instance")
            dest_record = _movable(records, states, destination_id, "destination")
            dest_state = states[destination_id]
            if dest_record.model != source.model:
                raise MigrationRefused(f"destination {destination_id!r} serves {dest_record.model!r}, the source "
                                       f"{source.model!r}: a request moves only between instances of one model")
            if dest_state.draining or dest_state.cordoned or not dest_state.healthy:
                flag = "draining" if dest_state.draining else ("cordoned" if dest_state.cordoned else "unhealthy")
                raise MigrationRefused(f"destination {destination_id!r} is {flag}: it takes no new requests")
        for iid in (source_id, destination_id):
            if iid in self.busy:
                raise MigrationRefused(f"instance {iid!r} is in a move already (one at a time); retry when it ends")
        headroom = self.policy.headroom
        loads = {s.instance_id: load_of(s, draining=records[s.instance_id].draining, migrating=s.instance_id in self.busy,
                                        headroom=headroom)
                 for s in states.values() if s.instance_id in records and records[s.instance_id].grpc_address
                 and s.healthy}
        source_load = load_of(states[source_id], draining=source.draining, migrating=False, headroom=headroom)
        if destination_id:
            destination = loads.get(destination_id) or load_of(states[destination_id], draining=False, migrating=False,
                                                               headroom=headroom)
        else:
            found = pick_destination(source_load, list(loads.values()))
            if found is None:
                raise MigrationRefused(f"no destination for {source_id!r}: no other healthy instance of "
                                       f"{source.model!r} with a Worker address takes new requests")
            destination = found
        assert source.grpc_address is not None
        try:
            limit = MAX_OPERATOR_CANDIDATES if request_id else self.max_candidates
            found_candidates = await self.client.candidates(source.grpc_address, limit)
        except grpc.aio.AioRpcError as exc:
            raise MigrationRefused(f"the Worker of {source_id!r} at {source.grpc_address} did not list its running "
                                   f"requests: {exc.code().name}: {exc.details()}") from None
        candidates = [MigrationCandidate(c.request_id, c.context_tokens, c.priority, c.tokens_generated)
                      for c in found_candidates]
        chosen = operator_choice(self.policy, source_load, destination, candidates,
                                 states[source_id].block_size_tokens, request_id)
        if chosen is None:
            if request_id:
                raise MigrationRefused(f"request {request_id!r} is not running and decoding on {source_id!r} now; "
                                       f"movable: {', '.join(c.request_id for c in candidates[:10]) or 'none'}",
                                       missing=True)
            raise MigrationRefused(f"no request on {source_id!r} can move to {destination.instance_id!r} now: "
                                   f"{len(candidates)} running and decoding, none fits in the destination's free KV")
        for iid in (source_id, destination.instance_id):  # the loop may have ordered one while we asked
            if iid in self.busy:
                raise MigrationRefused(f"instance {iid!r} is in a move already (one at a time); retry when it ends")
        order = MigrationOrder(chosen.request_id, source_id, destination.instance_id, "operator",
                               chosen.context_tokens)
        self.stats.last_orders = [order]
        dest_address = records[destination.instance_id].grpc_address
        assert dest_address is not None
        # Shielded: a caller that gives up (its deadline) must not abort a move half done.
        return await asyncio.shield(self._order(order, source.grpc_address, dest_address))

    async def _move(self, order: MigrationOrder, source_address: str,
                    request: worker_pb2.MigrateOutRequest) -> MoveOutcome:
        started_s = time.monotonic()
        final = worker_pb2.MigrationProgress(migration_id=request.migration_id, state=worker_pb2.ABORTED)
        try:
            final = await self.client.migrate(source_address, request)
            if final.state == worker_pb2.COMMITTED:
                self.stats.committed += 1
                self._count(order.reason, "committed")
            else:
                self.stats.aborted += 1
                self._count(order.reason, "aborted")
            log.info("migration ended", extra={
                "request_id": order.request_id, "from": order.source_id, "to": order.destination_id,
                "reason": order.reason, "state": worker_pb2.MigrationState.Name(final.state),
                "error": worker_pb2.MigrationError.Name(final.error)})
        except grpc.aio.AioRpcError as exc:
            self.stats.aborted += 1
            self._count(order.reason, "aborted")
            final.error_message = f"the source's Worker refused: {exc.code().name}: {exc.details()}"
            log.info("migration refused", extra={"request_id": order.request_id, "error": exc.code().name})
        finally:
            self.busy.discard(order.source_id)
            self.busy.discard(order.destination_id)
        return MoveOutcome(order, request.migration_id, final, time.monotonic() - started_s)


def _movable(records: dict[str, Any], states: dict[str, InstanceState], instance_id: str, role: str) -> Any:
    """The record of an instance a move may use; MigrationRefused naming what is missing."""
    record = records.get(instance_id)
    if record is None or instance_id not in states:
        raise MigrationRefused(f"{role} instance {instance_id!r} is not registered", missing=True)
    if not record.grpc_address:
        raise MigrationRefused(f"{role} instance {instance_id!r} has no Worker address (it registered without "
                               "worker_address): its requests cannot be moved (docs/migration.md)")
    return record


def build_migration_loop(spec: MigrationSpec, registry: Any, *, token: str | None,
                         metrics: RouterMetrics | None = None) -> MigrationLoop | None:
    """The loop the policy document's `migration:` section asks for (None when it is off);
    its Worker calls carry `token` (the fleet's worker token, `load.worker_token_file`)."""
    if not spec.active():
        return None
    return MigrationLoop(registry, spec.build_policy(), interval_s=spec.interval_s,
                         client=MigrationClient(token=token), metrics=metrics)
