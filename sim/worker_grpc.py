"""The Worker gRPC service (proto/tokenyard/v1/worker.proto) over any engine backend.

An engine (the emulated engine, or a sidecar next to a real one) implements the small
`WorkerBackend` protocol: its fixed description, its current load, and a way to wait
until the load changes. This module turns that into the `Worker` service: `Describe`,
and `Status`, a stream that sends a snapshot every `interval_ms` (a heartbeat) and
promptly whenever the load changes (at most one per `min_change_interval_ms`). The
migration RPCs (MigrateOut, MigrateIn, AbortMigration, ListMigrations) are delegated to
the backend's `migration` service when it has one (sim/migration_worker.py for the
emulated engine), and answered UNIMPLEMENTED (or empty) otherwise.

`EngineCoreBackend` adapts a bare `sim.engine_core.EngineCore`, so a core can be served
and tested without the HTTP engine around it; its driver calls `notify_changed()` after
each change it makes to the core (or uses the `add_request`/`abort`/`complete` wrappers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

import tokenyard
from tokenyard.grpc_limits import server_options
from tokenyard.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.worker_auth import check_bind, server_interceptors

if TYPE_CHECKING:
    from sim.engine_core import Batch, EngineCore, EngineRequest, StepOutput

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 200
MIN_INTERVAL_MS = 10
MAX_INTERVAL_MS = 60_000
# Status streams one engine serves at once: one per router process in the fleet (replicas x
# --workers) plus tools; past it a new stream is refused, so a caller holding streams open
# cannot make the engine's snapshot fan-out grow without bound (each costs a snapshot per
# change; 1,000 streams slowed a 200-token request by ~10% in stop 24's probe).
MAX_STATUS_STREAMS = 256
# Engines change load every iteration (tens of ms); without coalescing a busy engine
# would send a snapshot per iteration per subscriber.
DEFAULT_MIN_CHANGE_INTERVAL_MS = 10
ENGINE_KIND_EMULATED = "tokenyard-emulated"
# KV blocks travel in MigrateIn messages of up to ~3 MiB (sim/migration_worker.py).
MESSAGE_SIZE_OPTIONS = [("grpc.max_receive_message_length", 8 << 20)]


def worker_server_options() -> list[tuple[str, Any]]:
    """A Worker server's options: the message size above and the connection limits
    (handshake, idle, count) of tokenyard/grpc_limits.py."""
    return server_options(*MESSAGE_SIZE_OPTIONS)


@dataclass(frozen=True, slots=True)
class EngineDescriptionInfo:
    """What `Describe` answers: fixed facts of one engine instance (see worker.proto)."""

    instance_id: str
    model: str
    gpu: str
    tensor_parallel: int
    num_kv_blocks: int
    block_size_tokens: int
    kv_bytes_per_token: int
    max_model_len: int
    engine_kind: str
    engine_version: str
    incarnation_id: str
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    kv_transfer_backends: tuple[str, ...] = ()
    max_concurrent_migrations: int = 0

    def to_proto(self) -> worker_pb2.EngineDescription:
        return worker_pb2.EngineDescription(
            instance_id=self.instance_id,
            model=self.model,
            gpu=self.gpu,
            tensor_parallel=self.tensor_parallel,
            num_kv_blocks=self.num_kv_blocks,
            block_size_tokens=self.block_size_tokens,
            kv_bytes_per_token=self.kv_bytes_per_token,
            max_model_len=self.max_model_len,
            engine_kind=self.engine_kind,
            engine_version=self.engine_version,
            incarnation_id=self.incarnation_id,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            labels=dict(self.labels),
            kv_transfer_backends=list(self.kv_transfer_backends),
            max_concurrent_migrations=self.max_concurrent_migrations,
        )


@dataclass(frozen=True, slots=True)
class LoadInfo:
    """One engine's load at one moment (the payload of a `LoadSnapshot`)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size_tokens: int
    tokens_in_flight: int
    preemptions_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    prefix_cache_query_tokens_total: int = 0
    draining: bool = False
    migrations_out: int = 0
    migrations_in: int = 0
    kv_blocks_reserved_for_migration: int = 0
    kv_blocks_queued: int | None = None  # None: unknown (the snapshot leaves the field unset)
    running_by_priority: tuple[tuple[int, int], ...] | None = None  # (priority, running); None: unknown

    @classmethod
    def of_core(cls, core: EngineCore, draining: bool, *, migrations_out: int = 0, migrations_in: int = 0,
                kv_blocks_reserved_for_migration: int = 0) -> LoadInfo:
        """The load of an engine core as the Worker service reports it."""
        return cls(
            running=core.num_running,
            waiting=core.num_waiting,
            kv_blocks_used=core.kv_blocks_used,
            kv_blocks_total=core.num_kv_blocks,
            block_size_tokens=core.config.block_size,
            tokens_in_flight=core.tokens_in_flight,
            preemptions_total=core.preemptions_total,
            prefix_cache_hit_tokens_total=core.prefix_cache_hits_tokens,
            prefix_cache_query_tokens_total=core.prefix_cache_queries_tokens,
            draining=draining,
            migrations_out=migrations_out,
            migrations_in=migrations_in,
            kv_blocks_reserved_for_migration=kv_blocks_reserved_for_migration,
            kv_blocks_queued=core.waiting_blocks,
            running_by_priority=core.running_by_priority,
        )


class WorkerBackend(Protocol):
    """What an engine provides so that `WorkerServicer` can serve it."""

    def describe(self) -> EngineDescriptionInfo:
        """The instance's fixed facts; the same value for the life of the process."""
        ...

    def load(self) -> LoadInfo:
        """The current load; cheap, called on the event loop for every snapshot."""
        ...

    async def changed(self, seen_version: int, timeout_s: float) -> int:
        """Wait until the load version differs from `seen_version`, or `timeout_s` passes.

        Returns the current version (equal to `seen_version` on timeout). Returning at
        once when the version already differs is what makes a change between a
        snapshot and the next wait impossible to miss.
        """
        ...


class LoadChangeNotifier:
    """A version counter that waiters can block on; backends call `notify()` on change.

    Not thread-safe: call `notify()` on the event loop that serves the Worker service.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        # Waking every waiter and handing out a fresh event: each waiter then re-checks
        # the version, so none sleeps through a change.
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen_version: int, timeout_s: float) -> int:
        if self.version != seen_version or timeout_s <= 0:
            return self.version
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return self.version


class EngineCoreBackend:
    """`WorkerBackend` over a bare `EngineCore`; the driver reports changes to it.

    The core has no hooks of its own (it is shared with the simulator, which must not
    pay for notifications), so whoever mutates the core calls `notify_changed()`, or
    goes through the wrappers below that do it.
    """

    def __init__(
        self,
        core: EngineCore,
        instance_id: str,
        gpu: str | None = None,
        model: str | None = None,
        *,
        engine_kind: str = ENGINE_KIND_EMULATED,
        engine_version: str = tokenyard.__version__,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if not instance_id:
            raise ValueError("EngineCoreBackend: instance_id must be a non-empty string")
        self.core = core
        self.draining = False
        self._notifier = LoadChangeNotifier()
        engine = core.model
        self._description = EngineDescriptionInfo(
            instance_id=instance_id,
            model=model or engine.model.name,
            gpu=gpu or engine.gpu.name,
            tensor_parallel=engine.tp,
            num_kv_blocks=core.num_kv_blocks,
            block_size_tokens=core.config.block_size,
            kv_bytes_per_token=engine.model.kv_bytes_per_token,
            max_model_len=core.max_model_len,
            engine_kind=engine_kind,
            engine_version=engine_version,
            incarnation_id=uuid.uuid4().hex,
            max_num_seqs=core.config.max_num_seqs,
            max_num_batched_tokens=core.config.max_num_batched_tokens,
            labels=dict(labels or {}),
        )

    # ------------------------------------------------------------ WorkerBackend
    def describe(self) -> EngineDescriptionInfo:
        return self._description

    def load(self) -> LoadInfo:
        return LoadInfo.of_core(self.core, self.draining)

    async def changed(self, seen_version: int, timeout_s: float) -> int:
        return await self._notifier.wait(seen_version, timeout_s)

    # ------------------------------------------------------------ driver side
    def notify_changed(self) -> None:
        """Tell Status subscribers that the core's load may have changed."""
        self._notifier.notify()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self.notify_changed()

    def add_request(self, request: EngineRequest) -> None:
        self.core.add_request(request)
        self.notify_changed()

    def abort(self, request_id: str) -> EngineRequest | None:
        aborted = self.core.abort(request_id)
        self.notify_changed()
        return aborted

    def schedule(self) -> Batch:
        batch = self.core.schedule()
        self.notify_changed()  # admission and preemption change running/waiting/KV
        return batch

    def complete(self, batch: Batch, end_s: float) -> StepOutput:
        out = self.core.complete(batch, end_s)
        self.notify_changed()
        return out


def _check_interval_ms(name: str, value_ms: int, default_ms: int) -> int:
    if value_ms == 0:
        return default_ms
    if not MIN_INTERVAL_MS <= value_ms <= MAX_INTERVAL_MS:
        raise ValueError(
            f"StatusRequest.{name}: expected 0 (default {default_ms}) or a value "
            f"in [{MIN_INTERVAL_MS}, {MAX_INTERVAL_MS}], got {value_ms}"
        )
    return value_ms


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one backend; `close()` ends every open Status stream with status OK."""

    def __init__(self, backend: WorkerBackend) -> None:
        self.backend = backend
        self._sequence = itertools.count(1)  # one sequence per instance, across streams
        self._closing = asyncio.Event()
        self.open_streams = 0
        self.max_status_streams = MAX_STATUS_STREAMS

    def close(self) -> None:
        self._closing.set()

    def snapshot(self) -> worker_pb2.LoadSnapshot:
        description = self.backend.describe()
        load = self.backend.load()
        return worker_pb2.LoadSnapshot(
            instance_id=description.instance_id,
            sequence=next(self._sequence),
            timestamp_unix_ms=time.time_ns() // 1_000_000,
            running=load.running,
            waiting=load.waiting,
            kv_blocks_used=load.kv_blocks_used,
            kv_blocks_total=load.kv_blocks_total,
            block_size_tokens=load.block_size_tokens,
            tokens_in_flight=load.tokens_in_flight,
            preemptions_total=load.preemptions_total,
            prefix_cache_hit_tokens_total=load.prefix_cache_hit_tokens_total,
            prefix_cache_query_tokens_total=load.prefix_cache_query_tokens_total,
            draining=load.draining,
            incarnation_id=description.incarnation_id,
            migrations_out=load.migrations_out,
            migrations_in=load.migrations_in,
            kv_blocks_reserved_for_migration=load.kv_blocks_reserved_for_migration,
            kv_blocks_queued=load.kv_blocks_queued,
            running_by_priority=None if load.running_by_priority is None else worker_pb2.RunningByPriority(
                requests=dict(load.running_by_priority)),
        )

    async def Describe(  # noqa: N802 (gRPC method name)
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EngineDescription:
        return self.backend.describe().to_proto()

    async def Status(  # noqa: N802 (gRPC method name)
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LoadSnapshot]:
        try:
            interval_s = _check_interval_ms("interval_ms", request.interval_ms, DEFAULT_INTERVAL_MS) / 1000.0
            min_change_s = _check_interval_ms(
                "min_change_interval_ms", request.min_change_interval_ms, DEFAULT_MIN_CHANGE_INTERVAL_MS
            ) / 1000.0
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if self.open_streams >= self.max_status_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.open_streams} Status streams already open on this engine (at most "
                                f"{self.max_status_streams}); close one or retry later")
        peer = context.peer()
        instance_id = self.backend.describe().instance_id
        log.debug("status stream opened", extra={"instance": instance_id, "peer": peer, "interval_s": interval_s})
        self.open_streams += 1
        loop = asyncio.get_running_loop()
        closing = asyncio.ensure_future(self._closing.wait())
        waiter: asyncio.Future[int] | None = None
        sent = 0
        try:
            seen_version = -1  # differs from any version: the first snapshot goes out at once
            last_sent_s = float("-inf")
            next_beat_s = loop.time()
            while not self._closing.is_set():
                waiter = asyncio.ensure_future(
                    self.backend.changed(seen_version, max(0.0, next_beat_s - loop.time()))
                )
                done, _ = await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    break
                version = waiter.result()
                now_s = loop.time()
                if version != seen_version and now_s < next_beat_s:
                    # A change, not a heartbeat: hold it back to coalesce a burst.
                    hold_s = min(last_sent_s + min_change_s, next_beat_s) - now_s
                    if hold_s > 0:
                        await asyncio.sleep(hold_s)
                        version = await self.backend.changed(version, 0.0)
                seen_version = version
                yield self.snapshot()
                sent += 1
                last_sent_s = loop.time()
                next_beat_s = last_sent_s + interval_s
        except asyncio.CancelledError:
            # Client cancelled or the server stopped without grace: a normal end.
            log.debug("status stream cancelled", extra={"instance": instance_id, "peer": peer, "sent": sent})
            raise
        finally:
            closing.cancel()
            if waiter is not None:
                waiter.cancel()
            self.open_streams -= 1
        log.debug("status stream closed", extra={"instance": instance_id, "peer": peer, "sent": sent})


    # ------------------------------------------------------------ migration
    # Delegated to the backend's `migration` (sim/migration_worker.MigrationService);
    # a backend without one answers UNIMPLEMENTED.
    def _migration(self) -> Any:
        return getattr(self.backend, "migration", None)

    async def MigrateOut(  # noqa: N802 (gRPC method name)
        self, request: worker_pb2.MigrateOutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.MigrationProgress]:
        service = self._migration()
        if service is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this engine cannot migrate requests")
        async for progress in service.migrate_out(request, context):
            yield progress

    async def MigrateIn(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[worker_pb2.MigrateInChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.MigrateInResult]:
        service = self._migration()
        if service is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this engine cannot migrate requests")
        async for result in service.migrate_in(request_iterator, context):
            yield result

    async def AbortMigration(  # noqa: N802 (gRPC method name)
        self, request: worker_pb2.AbortMigrationRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortMigrationResult:
        service = self._migration()
        if service is None:
            return worker_pb2.AbortMigrationResult(found=False)
        result: worker_pb2.AbortMigrationResult = service.abort(request)
        return result

    async def ListMigrations(  # noqa: N802 (gRPC method name)
        self, request: worker_pb2.ListMigrationsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListMigrationsResponse:
        service = self._migration()
        if service is None:
            return worker_pb2.ListMigrationsResponse()
        try:
            response: worker_pb2.ListMigrationsResponse = service.list(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return response


def add_worker_servicer(server: grpc.aio.Server, backend: WorkerBackend) -> WorkerServicer:
    """Serve `backend` as the Worker service on an existing server (to share a port)."""
    servicer = WorkerServicer(backend)
    # The generated gRPC module has no annotations (grpcio-tools writes none).
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer


async def start_worker_server(
    backend: WorkerBackend, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None
) -> grpc.aio.Server:
    """Start a grpc.aio server serving only the Worker service for `backend`.

    With `token`, every call must carry it (tokenyard/worker_auth.py); without one, only
    a loopback `host` is allowed (ConfigError otherwise).

    Stop it with `await server.stop(grace_s)`; open Status streams are cancelled when
    the grace period ends (clients see CANCELLED or UNAVAILABLE and reconnect).
    """
    check_bind(host, token)
    server = grpc.aio.server(options=worker_server_options(), interceptors=server_interceptors(token))
    add_worker_servicer(server, backend)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"Worker gRPC server: cannot listen on {address}: {err}") from err
    if bound == 0:
        raise OSError(f"Worker gRPC server: cannot listen on {address} (port in use or bad host?)")
    await server.start()
    log.info(
        "worker grpc server started",
        extra={"instance": backend.describe().instance_id, "address": f"{host}:{bound}"},
    )
    return server
