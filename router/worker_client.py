"""Router side of the Worker gRPC service: engine load as a stream of InstanceState updates.

`WorkerClient` subscribes to one engine's `Worker.Status` stream (proto/tokenyard/v1/
worker.proto) and copies every snapshot into that instance's `scheduler.types.InstanceState`,
in place, so the dispatcher always reads the latest numbers without polling. It calls
`Describe` on every (re)connection, because a restarted engine may come back with another
KV geometry. When the stream breaks, goes silent for `stale_after_s`, or cannot be opened,
it marks the instance unhealthy, waits with exponential backoff and jitter, and reconnects;
the first snapshot after that marks it healthy again.

Two ways to consume it: an async iterator (`async for state in client.updates()`), or a
background task (`client.start()`, with `on_update` called after each change, then
`await client.stop()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from scheduler.priority_headroom import MAX_PRIORITY_CLASSES
from scheduler.types import InstanceState, RunningByPriority
from tokenyard.logs import RateLimitedLog
from tokenyard.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.worker_auth import worker_channel

log = logging.getLogger(__name__)
# Per instance at most one warning a minute: an engine repeats a bad field in every snapshot.
_bad_snapshot = RateLimitedLog(log, interval_s=60.0)

T = TypeVar("T")


def apply_description(state: InstanceState, description: worker_pb2.EngineDescription) -> None:
    """Copy an engine's self-description into its InstanceState (the engine is authoritative)."""
    if description.model:
        state.model = description.model
    if description.gpu:
        state.gpu = description.gpu
    if description.tensor_parallel:
        state.tp = description.tensor_parallel
    if description.block_size_tokens:
        state.block_size_tokens = description.block_size_tokens
    if description.num_kv_blocks:
        state.kv_blocks_total = description.num_kv_blocks


def running_by_priority_of(snapshot: worker_pb2.LoadSnapshot) -> RunningByPriority | None:
    """The snapshot's running requests per priority class, None when it does not say (an
    engine that does not know them; the priority headroom then counts none) or names more
    than MAX_PRIORITY_CLASSES classes (a bound on what a peer can make the router keep)."""
    if not snapshot.HasField("running_by_priority"):
        return None
    requests = snapshot.running_by_priority.requests
    if len(requests) > MAX_PRIORITY_CLASSES:
        _bad_snapshot.warning(f"priority-classes:{snapshot.instance_id}",
                              "load snapshot names too many priority classes; counting no priority headroom",
                              extra={"instance": snapshot.instance_id, "classes": len(requests),
                                     "limit": MAX_PRIORITY_CLASSES})
        return None
    return tuple(sorted((priority, count) for priority, count in requests.items() if count))


def apply_snapshot(state: InstanceState, snapshot: worker_pb2.LoadSnapshot, now_s: float,
                   router_draining: bool = False) -> None:
    """Copy one load snapshot into an InstanceState; `router_inflight` is the router's own.

    The instance drains when the engine says so (`snapshot.draining`) or when the router
    was told to (`router_draining`: Admin DrainInstance, kept in the registry's record);
    a snapshot never undoes an operator's drain.
    """
    state.running = snapshot.running
    state.waiting = snapshot.waiting
    state.kv_blocks_used = snapshot.kv_blocks_used
    state.kv_blocks_total = snapshot.kv_blocks_total
    if snapshot.block_size_tokens:
        state.block_size_tokens = snapshot.block_size_tokens
    state.tokens_in_flight = snapshot.tokens_in_flight
    # An engine that does not report its queued demand leaves it unset: estimated then.
    state.kv_blocks_queued = snapshot.kv_blocks_queued if snapshot.HasField("kv_blocks_queued") else None
    state.running_by_priority = running_by_priority_of(snapshot)
    state.draining = snapshot.draining or router_draining
    state.healthy = True
    state.updated_s = now_s


class WorkerClient:
    """A reconnecting subscription to one engine's Worker service.

    `address` is the engine's Worker gRPC "host:port". `state` is the InstanceState the
    router already holds for the instance (updated in place); without one, a state is
    made from the first Describe. `clock` stamps `InstanceState.updated_s` and must be
    the clock the router compares it with.
    """

    def __init__(
        self,
        address: str,
        state: InstanceState | None = None,
        *,
        interval_ms: int = 200,
        min_change_interval_ms: int = 0,
        on_update: Callable[[InstanceState], None] | None = None,
        stale_after_s: float | None = None,
        connect_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        mark_unhealthy_on_loss: bool = True,
        clock: Callable[[], float] = time.monotonic,
        router_draining: Callable[[], bool] | None = None,
        token: str | None = None,
    ) -> None:
        if not address or ":" not in address:
            raise ValueError(f"WorkerClient: address must be 'host:port', got {address!r}")
        if not 10 <= interval_ms <= 60_000:
            raise ValueError(f"WorkerClient: interval_ms must be in [10, 60000], got {interval_ms}")
        if min_change_interval_ms and not 10 <= min_change_interval_ms <= 60_000:
            raise ValueError(
                f"WorkerClient: min_change_interval_ms must be 0 (the server's default) or in "
                f"[10, 60000], got {min_change_interval_ms}"
            )
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"WorkerClient: expected 0 < backoff_initial_s <= backoff_max_s, "
                f"got {backoff_initial_s} and {backoff_max_s}"
            )
        self.address = address
        self.state = state
        self.interval_ms = interval_ms
        # Raise it when watching many busy engines: it bounds snapshots per second.
        self.min_change_interval_ms = min_change_interval_ms
        self.on_update = on_update
        # Snapshots come at least every interval; a few missed ones mean a hung peer.
        self.stale_after_s = stale_after_s or max(1.0, 5 * interval_ms / 1000.0)
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.mark_unhealthy_on_loss = mark_unhealthy_on_loss
        self.clock = clock
        # Whether the router itself drains the instance (its registry record's flag).
        self.router_draining = router_draining
        self.token = token  # the fleet's Worker bearer token (tokenyard/worker_auth.py)
        self.description: worker_pb2.EngineDescription | None = None
        self.connected = False
        self.connections = 0  # successful stream openings, reconnections included
        self.snapshots = 0
        self.last_sequence = 0
        self._incarnation = ""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ one-shot calls
    async def describe(self) -> worker_pb2.EngineDescription:
        """Call Describe once (its own connection); raises grpc.aio.AioRpcError on failure."""
        async with worker_channel(self.address, self.token) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]  # generated grpc module, unannotated
            description: worker_pb2.EngineDescription = await stub.Describe(
                worker_pb2.DescribeRequest(), timeout=self.connect_timeout_s)
            return description

    # ------------------------------------------------------------ subscription
    async def updates(self) -> AsyncIterator[InstanceState]:
        """Yield the InstanceState after every snapshot and every loss of the stream.

        Runs until `stop()`; reconnects on its own. The same object is yielded each
        time (updated in place).
        """
        backoff_s = self.backoff_initial_s
        while not self._stop.is_set():
            # A fresh channel per attempt: a channel's own reconnect backoff grows to
            # minutes, and this loop wants its own, bounded one.
            channel = worker_channel(self.address, self.token)
            call: grpc.aio.UnaryStreamCall | None = None
            delay_s = backoff_s
            try:
                stub = worker_pb2_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]  # generated grpc module, unannotated
                description = await self._until_stopped(
                    stub.Describe(worker_pb2.DescribeRequest(), timeout=self.connect_timeout_s)
                )
                if description is None:
                    break
                self._on_description(description)
                call = stub.Status(
                    worker_pb2.StatusRequest(
                        interval_ms=self.interval_ms, min_change_interval_ms=self.min_change_interval_ms
                    )
                )
                while True:
                    snapshot = await self._until_stopped(call.read(), timeout_s=self.stale_after_s)
                    if snapshot is None:
                        return
                    if snapshot is grpc.aio.EOF:
                        raise ConnectionError("the server ended the Status stream")
                    if self._on_snapshot(snapshot):
                        backoff_s = self.backoff_initial_s
                        assert self.state is not None
                        yield self.state
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError) as err:
                reason = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)
                delay_s = backoff_s * random.uniform(0.5, 1.0)  # jitter: engines restart in herds
                # Loud once when a live stream breaks, quiet while the engine stays down.
                log.log(
                    logging.WARNING if self.connected else logging.DEBUG,
                    "worker status stream lost" if self.connected else "worker status stream not available",
                    extra={"address": self.address, "reason": reason, "retry_in_s": round(delay_s, 3)},
                )
                if self._on_loss():
                    assert self.state is not None
                    yield self.state
            finally:
                if call is not None:
                    call.cancel()
                await channel.close()
            backoff_s = min(backoff_s * 2.0, self.backoff_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay_s)

    def start(self) -> asyncio.Task[None]:
        """Run the subscription in the background, calling `on_update` after each change."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"WorkerClient for {self.address} is already running")
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"worker-client {self.address}")
        return self._task

    async def stop(self) -> None:
        """End the subscription (either way of consuming it) and wait for the task to end."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        async for state in self.updates():
            if self.on_update is None:
                continue
            try:
                self.on_update(state)
            except Exception:
                # A bug in the consumer must not end the subscription of a live engine.
                log.exception("worker client on_update failed", extra={"address": self.address})

    # ------------------------------------------------------------ internals
    async def _until_stopped(self, awaitable: Awaitable[T], timeout_s: float | None = None) -> T | None:
        """Await `awaitable` unless stop() comes first (then None); TimeoutError on timeout."""
        work = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({work, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if work in done:
            return work.result()
        work.cancel()
        if stopper in done:
            return None
        raise TimeoutError(f"no Status snapshot from {self.address} for {timeout_s} s")

    def _on_description(self, description: worker_pb2.EngineDescription) -> None:
        self.description = description
        if self.state is None:
            self.state = InstanceState(instance_id=description.instance_id or self.address, model=description.model)
        elif description.instance_id and description.instance_id != self.state.instance_id:
            log.warning(
                "worker reports another instance id than the router's",
                extra={"address": self.address, "expected": self.state.instance_id, "got": description.instance_id},
            )
        apply_description(self.state, description)

    def _on_snapshot(self, snapshot: worker_pb2.LoadSnapshot) -> bool:
        """Apply a snapshot; False when it is older than one already applied."""
        assert self.state is not None
        if snapshot.incarnation_id != self._incarnation:
            self._incarnation = snapshot.incarnation_id  # a restart: sequences start over
            self.last_sequence = 0
        elif snapshot.sequence <= self.last_sequence:
            return False
        self.last_sequence = snapshot.sequence
        if not self.connected:
            self.connected = True
            self.connections += 1
            log.info("worker status stream connected", extra={"address": self.address, "instance": self.state.instance_id})
        self.snapshots += 1
        apply_snapshot(self.state, snapshot, self.clock(),
                       self.router_draining() if self.router_draining is not None else False)
        return True

    def _on_loss(self) -> bool:
        """Record a lost stream; True when the state changed and should be reported."""
        self.connected = False
        if self.state is None or not self.mark_unhealthy_on_loss or not self.state.healthy:
            return False
        self.state.healthy = False
        return True


class MigrationClient:
    """The migration calls of the Worker service (router/migration_loop.py uses them).

    One channel per engine address, kept open; every call has a deadline and carries
    `token` (the fleet's Worker bearer token) when there is one.
    """

    def __init__(self, *, timeout_s: float = 60.0, token: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = worker_channel(address, self.token)
        return worker_pb2_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]

    async def candidates(self, address: str, limit: int = 16) -> list[worker_pb2.MigrationCandidate]:
        """Running requests the engine at `address` could move out now, shortest first."""
        response = await self._stub(address).ListMigrations(
            worker_pb2.ListMigrationsRequest(include_candidates=True, max_candidates=limit), timeout=5.0)
        return list(response.candidates)

    async def migrate(self, source_address: str, request: worker_pb2.MigrateOutRequest
                      ) -> worker_pb2.MigrationProgress:
        """Run MigrateOut to its end; the final progress (COMMITTED or ABORTED)."""
        last = worker_pb2.MigrationProgress(migration_id=request.migration_id, state=worker_pb2.ABORTED)
        async for progress in self._stub(source_address).MigrateOut(request, timeout=self.timeout_s):
            last = progress
        return last

    async def abort(self, address: str, migration_id: str, reason: str = "") -> worker_pb2.AbortMigrationResult:
        result: worker_pb2.AbortMigrationResult = await self._stub(address).AbortMigration(
            worker_pb2.AbortMigrationRequest(migration_id=migration_id, reason=reason), timeout=5.0)
        return result

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
