"""Live migration in the emulated engine: the four migration RPCs of the Worker service.

`MigrationService` implements MigrateOut (this engine as the source: it drives the copy),
MigrateIn (this engine as the destination), AbortMigration and ListMigrations over one
`sim.emulated_engine.EmulatedEngine`, following the state machine in
proto/tokenyard/v1/worker.proto and docs/migration.md. It is the reference a sidecar
next to a real vLLM implements (docs/migration.md, "How a real vLLM joins").

KV bytes: the emulated engine has no GPU, so a request's KV cache is defined, token by
token, as a deterministic byte pattern (its text seed and the token's position, repeated
to `kv_wire_bytes_per_token`, which defaults to the model's real KV bytes per token and is
scaled down in tests). The source reads those bytes (or the bytes it received, for a
request that migrated in), sends them over gRPC in stages, and the destination checks
every byte against the pattern before it stores it, so a lost, reordered or corrupted
block is caught (INCOMPATIBLE) rather than decoded on.

Faults for tests: `fault_hook`, if set, is awaited at each named step of both sides
(`source:begin`, `source:stage`, `source:final`, `source:commit`, `dest:begin`,
`dest:stage`, `dest:commit`), with the migration id; whatever it raises or does (stop a
server, sleep past a timeout) happens at that step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from tokenyard.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.worker_auth import worker_channel

if TYPE_CHECKING:
    from scheduler.engine_model import EngineModel

log = logging.getLogger(__name__)

pb = worker_pb2
KV_BACKEND_GRPC_INLINE = "grpc-inline"
MAX_MESSAGE_DATA_BYTES = 3 << 20  # under gRPC's default 4 MiB receive limit, with room for ids
MAX_ID_CHARS = 128
MAX_ENGINE_STATE_BYTES = 64 << 10
FINISHED_KEPT = 64  # finished migrations ListMigrations still lists
# A destination's bounds on one MigrateIn stream, so that a source that stops sending
# (hostile, SIGSTOPped, partitioned without a TCP reset) cannot hold its KV reservation
# and migration slot for ever (measured: both held indefinitely before, 257 blocks per
# stalled stream). The longest gap a well-behaved source leaves is one stage timeout
# (at most 60 s, `out_params`), its whole run one deadline (at most 600 s).
MIGRATE_IN_IDLE_S = 60.0
MIGRATE_IN_LIFETIME_S = 600.0
_MASK64 = (1 << 64) - 1

FaultHook = Callable[[str, str], Awaitable[None]]  # (step, migration id)


class MigrationAborted(Exception):
    """A migration gives up; `error` is the MigrationError it reports."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


# ----------------------------------------------------------------- KV bytes
def token_kv_bytes(seed: int, position: int, bytes_per_token: int) -> bytes:
    """The KV bytes of one token: (seed, position) as 16 bytes, repeated."""
    return struct.pack("<QQ", seed & _MASK64, position) * (bytes_per_token // 16)


def pattern_bytes(seed: int, first_token: int, tokens: int, bytes_per_token: int) -> bytes:
    return b"".join(token_kv_bytes(seed, p, bytes_per_token) for p in range(first_token, first_token + tokens))


@dataclass(slots=True)
class RequestKV:
    """The KV bytes of one request: blocks received from a source, the rest by pattern."""

    seed: int
    bytes_per_token: int
    block_size: int
    received: dict[int, bytes] = field(default_factory=dict)  # block id -> bytes (maybe partial)

    def block(self, block_id: int, tokens: int) -> bytes:
        """Bytes of `tokens` tokens of block `block_id` (the block's first tokens)."""
        size = tokens * self.bytes_per_token
        stored = self.received.get(block_id, b"")
        if len(stored) >= size:
            return stored[:size]
        have = len(stored) // self.bytes_per_token
        first = block_id * self.block_size
        return stored + pattern_bytes(self.seed, first + have, tokens - have, self.bytes_per_token)

    def check(self, block_id: int, data: bytes) -> bool:
        """True if `data` are exactly the bytes this request's block must hold."""
        if len(data) % self.bytes_per_token or len(data) > self.block_size * self.bytes_per_token:
            return False
        tokens = len(data) // self.bytes_per_token
        return data == pattern_bytes(self.seed, block_id * self.block_size, tokens, self.bytes_per_token)


def wire_bytes_per_token(configured: int) -> int:
    """Bytes per token on the wire: a multiple of 16 (the pattern's unit), at least 16."""
    return max(16, configured - configured % 16)


@dataclass(frozen=True, slots=True)
class RequestState:
    """A running request as a migration's source sees it at one step."""

    prompt_tokens: int
    tokens_generated: int
    context_tokens: int  # tokens with KV computed (prompt + generated - 1 while decoding)
    max_tokens: int
    priority: int
    engine_state: dict[str, Any]
    kv: RequestKV


# ----------------------------------------------------------------- records
@dataclass(slots=True)
class MigrationRecord:
    migration_id: str
    request_id: str
    role: str  # "source" or "destination"
    peer_instance_id: str
    started_unix_ms: int
    state: int = pb.PREPARING
    stage: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0
    error: int = pb.MIGRATION_ERROR_NONE
    error_message: str = ""
    reserved_blocks: int = 0
    abort_requested: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def final(self) -> bool:
        return self.state in (pb.COMMITTED, pb.ABORTED)

    def info(self) -> worker_pb2.MigrationInfo:
        return pb.MigrationInfo(
            migration_id=self.migration_id, request_id=self.request_id, role=self.role,
            peer_instance_id=self.peer_instance_id, state=self.state, stage=self.stage,  # type: ignore[arg-type]
            blocks_copied=self.blocks_copied, started_unix_ms=self.started_unix_ms,
            error=self.error,  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class OutParams:
    max_stages: int
    stop_copy_max_blocks: int
    stage_timeout_s: float
    deadline_s: float
    attach_timeout_ms: int


def out_params(request: worker_pb2.MigrateOutRequest) -> OutParams:
    """The MigrateOut limits with defaults applied; ValueError names a field out of range."""
    for name in ("migration_id", "request_id", "destination_instance_id", "destination_address"):
        value = getattr(request, name)
        if not value or len(value) > MAX_ID_CHARS:
            raise ValueError(f"MigrateOutRequest.{name}: expected 1 to {MAX_ID_CHARS} characters, got {len(value)}")

    def bounded(name: str, default: int, high: int) -> int:
        value = int(getattr(request, name))
        if value == 0:
            return default
        if value > high:
            raise ValueError(f"MigrateOutRequest.{name}: expected 0 (default {default}) to {high}, got {value}")
        return value

    return OutParams(
        max_stages=bounded("max_stages", 4, 16),
        stop_copy_max_blocks=bounded("stop_copy_max_blocks", 2, 1 << 20),
        stage_timeout_s=bounded("stage_timeout_ms", 2000, 60_000) / 1000.0,
        deadline_s=bounded("deadline_ms", 30_000, 600_000) / 1000.0,
        attach_timeout_ms=bounded("attach_timeout_ms", 10_000, 600_000),
    )


class MigrationEngine(Protocol):
    """What `MigrationService` reads and calls of its engine: `sim.emulated_engine.EmulatedEngine`
    and its `sim.engine_migration.EngineMigration` steps (named by shape, not imported: the
    engine imports this module to serve the migration RPCs)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def engine_model(self) -> EngineModel: ...

    @property
    def block_size(self) -> int: ...

    @property
    def kv_wire_bytes_per_token(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    @property
    def running(self) -> bool: ...

    def notify_load_changed(self) -> None: ...

    def migration_candidate_problem(self, request_id: str) -> str | None: ...

    def migration_candidates(self, limit: int, busy: set[str]) -> list[Any]: ...

    def migration_state(self, request_id: str) -> RequestState: ...

    def migration_suspend(self, request_id: str) -> RequestState: ...

    def migration_resume(self, request_id: str) -> None: ...

    def migration_release(self, request_id: str, destination: dict[str, Any]) -> None: ...

    def migration_seed(self, engine_state: bytes) -> int: ...

    def migration_reserve(self, begin: pb.MigrateInBegin) -> int: ...

    def migration_unreserve(self, blocks: int) -> None: ...

    def migration_adopt(
        self, begin: pb.MigrateInBegin, commit: pb.MigrateInCommit, kv: RequestKV, reserved_blocks: int
    ) -> str: ...


class MigrationService:
    """The migration RPCs over one emulated engine (source and destination roles)."""

    def __init__(self, engine: MigrationEngine, *, max_concurrent: int = 2,
                 idle_timeout_s: float = MIGRATE_IN_IDLE_S, max_lifetime_s: float = MIGRATE_IN_LIFETIME_S) -> None:
        self.engine = engine
        self.max_concurrent = max_concurrent
        # The destination's own bounds on a MigrateIn stream: its reservation must not
        # outlive a source that stops sending (see MIGRATE_IN_IDLE_S).
        self.idle_timeout_s = idle_timeout_s
        self.max_lifetime_s = max_lifetime_s
        self.records: OrderedDict[str, MigrationRecord] = OrderedDict()
        self.fault_hook: FaultHook | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.token: str | None = None  # the fleet's Worker token, sent to MigrateIn (EngineServer sets it)
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ views
    def active(self, role: str | None = None) -> int:
        return sum(1 for r in self.records.values() if not r.final and (role is None or r.role == role))

    def reserved_blocks(self) -> int:
        return sum(r.reserved_blocks for r in self.records.values() if r.role == "destination" and not r.final)

    def migrating(self, request_id: str) -> bool:
        return any(r.request_id == request_id and not r.final for r in self.records.values())

    async def _fault(self, point: str, migration_id: str) -> None:
        if self.fault_hook is not None:
            await self.fault_hook(point, migration_id)

    def _remember(self, record: MigrationRecord) -> None:
        self.records[record.migration_id] = record
        finished = [k for k, r in self.records.items() if r.final]
        for key in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self.records[key]

    def _finish(self, record: MigrationRecord, state: int, error: int = pb.MIGRATION_ERROR_NONE,
                message: str = "") -> None:
        record.state = state
        record.error = error
        record.error_message = message
        record.done.set()
        self.engine.notify_load_changed()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    # ------------------------------------------------------------ MigrateOut (source)
    async def migrate_out(self, request: worker_pb2.MigrateOutRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.MigrationProgress]:
        try:
            params = out_params(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self.engine
        if request.migration_id in self.records:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"migration {request.migration_id} exists")
        problem = engine.migration_candidate_problem(request.request_id)
        if problem is not None:
            code = grpc.StatusCode.NOT_FOUND if "no running request" in problem else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, problem)
        if self.active() >= self.max_concurrent or self.migrating(request.request_id):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.active()} migrations in flight (at most {self.max_concurrent}), "
                                "or this request is migrating already")
        record = MigrationRecord(request.migration_id, request.request_id, "source",
                                 request.destination_instance_id, time.time_ns() // 1_000_000)
        self._remember(record)
        engine.notify_load_changed()
        progress: asyncio.Queue[worker_pb2.MigrationProgress] = asyncio.Queue()
        # The migration runs on its own: a controller that goes away does not abort it.
        task = asyncio.create_task(self._run_out(record, request, params, progress.put_nowait))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        while True:
            item = await progress.get()
            yield item
            if item.state in (pb.COMMITTED, pb.ABORTED):
                return

    def _progress(self, record: MigrationRecord, tokens: int, **extra: Any) -> worker_pb2.MigrationProgress:
        return pb.MigrationProgress(
            migration_id=record.migration_id, state=record.state, stage=record.stage,  # type: ignore[arg-type]
            blocks_copied=record.blocks_copied, bytes_copied=record.bytes_copied, tokens_generated=tokens,
            error=record.error, error_message=record.error_message, **extra,  # type: ignore[arg-type]
        )

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = worker_channel(
                address, self.token, options=[("grpc.max_send_message_length", 8 << 20)])
        return channel

    async def _run_out(self, record: MigrationRecord, request: worker_pb2.MigrateOutRequest, params: OutParams,
                       report: Callable[[worker_pb2.MigrationProgress], None]) -> None:
        engine = self.engine
        suspended = False
        call: Any = None
        started = time.monotonic()
        tokens = 0
        try:
            # The generated gRPC module has no annotations (grpcio-tools writes none).
            stub = worker_pb2_grpc.WorkerStub(self._channel(request.destination_address))  # type: ignore[no-untyped-call]
            call = stub.MigrateIn(timeout=params.deadline_s)
            read_timeout = params.stage_timeout_s

            async def expect(state: int) -> worker_pb2.MigrateInResult:
                remaining = params.deadline_s - (time.monotonic() - started)
                if record.abort_requested.is_set():
                    raise MigrationAborted(pb.ABORTED_BY_REQUEST, "aborted by request")
                try:
                    # grpc has no type stubs: the read is Any; the Worker proto says what it is.
                    answer: worker_pb2.MigrateInResult = await asyncio.wait_for(call.read(), min(read_timeout, max(0.001, remaining)))
                except TimeoutError:
                    raise MigrationAborted(pb.TIMEOUT, f"no answer from the destination within "
                                                       f"{min(read_timeout, remaining) * 1000:.0f} ms") from None
                except grpc.aio.AioRpcError as exc:
                    raise MigrationAborted(pb.DESTINATION_UNREACHABLE, f"destination: {exc.code().name}: "
                                                                       f"{exc.details()}") from None
                except asyncio.InvalidStateError as exc:  # grpc: the RPC already ended (destination gone)
                    raise MigrationAborted(pb.DESTINATION_UNREACHABLE, f"destination stream: {exc}") from None
                if answer is grpc.aio.EOF:
                    raise MigrationAborted(pb.DESTINATION_UNREACHABLE, "the destination closed the stream")
                if answer.state == pb.ABORTED:
                    raise MigrationAborted(answer.error or pb.DESTINATION_UNREACHABLE,
                                           f"destination: {answer.error_message}")
                if answer.state != state:
                    raise MigrationAborted(pb.INCOMPATIBLE, f"destination answered state {answer.state}, "
                                                            f"expected {state}")
                return answer

            async def send(chunk: worker_pb2.MigrateInChunk) -> None:
                try:
                    await call.write(chunk)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                    # InvalidStateError: grpc's "RPC already finished", a write after the
                    # destination ended the stream (it died or was stopped).
                    raise MigrationAborted(pb.DESTINATION_UNREACHABLE, f"destination stream: {exc}") from None

            await self._fault("source:begin", record.migration_id)
            state = engine.migration_state(request.request_id)
            tokens = state.tokens_generated
            await send(pb.MigrateInChunk(begin=pb.MigrateInBegin(
                migration_id=record.migration_id, request_id=request.request_id,
                source_instance_id=engine.instance_id, destination_instance_id=request.destination_instance_id,
                model=engine.engine_model.model.name, block_size_tokens=engine.block_size,
                kv_bytes_per_token=engine.kv_wire_bytes_per_token, prompt_tokens=state.prompt_tokens,
                tokens_generated=state.tokens_generated, max_tokens=state.max_tokens,
                engine_state=json.dumps({**state.engine_state, "attach_timeout_ms": params.attach_timeout_ms}).encode(),
                priority=state.priority, kv_transfer_backend=KV_BACKEND_GRPC_INLINE,
            )))
            answer = await expect(pb.RESERVED)
            record.state = pb.PRE_COPY
            report(self._progress(record, tokens))
            sent_full = 0  # blocks 0 .. sent_full - 1 are copied (full)
            bs = engine.block_size
            while True:
                await self._fault("source:stage", record.migration_id)
                state = engine.migration_state(request.request_id)  # raises MigrationAborted if it ended
                full = state.context_tokens // bs
                new_blocks = full - sent_full
                if record.stage >= params.max_stages or (record.stage > 0 and new_blocks <= params.stop_copy_max_blocks):
                    break
                record.stage += 1
                await self._send_blocks(send, record, state.kv, range(sent_full, full), bs, final=False)
                sent_full = full
                await expect(pb.STAGE_ACKED)
                tokens = state.tokens_generated
                report(self._progress(record, tokens))
            # Stop and copy: from here on the request emits nothing at the source.
            await self._fault("source:final", record.migration_id)
            suspend_at = time.monotonic()
            state = engine.migration_suspend(request.request_id)
            suspended = True
            record.state = pb.STOP_AND_COPY
            record.stage += 1
            total = -(-state.context_tokens // bs)
            tail = [(b, bs) for b in range(sent_full, state.context_tokens // bs)]
            if state.context_tokens % bs:
                tail.append((total - 1, state.context_tokens % bs))
            await self._send_block_list(send, record, state.kv, tail, final=True)
            await expect(pb.STAGE_ACKED)
            await self._fault("source:commit", record.migration_id)
            await send(pb.MigrateInChunk(commit=pb.MigrateInCommit(
                tokens_generated=state.tokens_generated, context_tokens=state.context_tokens, blocks_total=total)))
            answer = await expect(pb.COMMITTED)
            suspended_us = int((time.monotonic() - suspend_at) * 1e6)
            tokens = state.tokens_generated
            engine.migration_release(request.request_id, {
                "migration_id": record.migration_id,
                "destination_instance_id": request.destination_instance_id,
                "destination_request_id": answer.destination_request_id,
                "tokens": tokens,
            })
            suspended = False
            self._finish(record, pb.COMMITTED)
            report(self._progress(record, tokens, suspended_us=suspended_us,
                                  destination_request_id=answer.destination_request_id))
            with contextlib.suppress(Exception):
                await call.done_writing()
        except MigrationAborted as exc:
            self._abort_out(record, call, suspended, exc.error, exc.message)
            report(self._progress(record, tokens))
        except asyncio.CancelledError:
            self._abort_out(record, call, suspended, pb.SOURCE_UNREACHABLE, "the source is shutting down")
            report(self._progress(record, tokens))
            raise
        except Exception as exc:  # a bug must not leave a request suspended forever
            log.exception("migration failed", extra={"migration_id": record.migration_id})
            self._abort_out(record, call, suspended, pb.INCOMPATIBLE, f"{type(exc).__name__}: {exc}")
            report(self._progress(record, tokens))

    def _abort_out(self, record: MigrationRecord, call: Any, suspended: bool, error: int, message: str) -> None:
        if suspended:
            self.engine.migration_resume(record.request_id)
        if call is not None:
            call.cancel()  # the destination frees everything when its stream ends before Commit
        self._finish(record, pb.ABORTED, error, message)
        log.info("migration aborted", extra={"migration_id": record.migration_id, "error": message})

    async def _send_blocks(self, send: Callable[[worker_pb2.MigrateInChunk], Awaitable[None]],
                           record: MigrationRecord, kv: RequestKV, block_ids: range, bs: int,
                           *, final: bool) -> None:
        await self._send_block_list(send, record, kv, [(b, bs) for b in block_ids], final=final)

    async def _send_block_list(self, send: Callable[[worker_pb2.MigrateInChunk], Awaitable[None]],
                               record: MigrationRecord, kv: RequestKV, blocks: list[tuple[int, int]],
                               *, final: bool) -> None:
        """Send (block id, tokens) blocks of one stage in messages of at most ~3 MiB."""
        ids: list[int] = []
        parts: list[bytes] = []
        size = 0
        covered = 0
        for index, (block_id, tokens) in enumerate(blocks):
            data = kv.block(block_id, tokens)
            ids.append(block_id)
            parts.append(data)
            size += len(data)
            covered = block_id * kv.block_size + tokens
            last = index == len(blocks) - 1
            if size >= MAX_MESSAGE_DATA_BYTES - len(data) or last:
                await send(pb.MigrateInChunk(blocks=pb.KVBlocks(
                    stage=record.stage, block_ids=ids, data=b"".join(parts), tokens_covered=covered,
                    last_of_stage=last, final=final)))
                record.blocks_copied += len(ids)
                record.bytes_copied += size
                ids, parts, size = [], [], 0
        if not blocks:
            await send(pb.MigrateInChunk(blocks=pb.KVBlocks(stage=record.stage, last_of_stage=True, final=final)))

    # ------------------------------------------------------------ MigrateIn (destination)
    async def migrate_in(self, chunks: AsyncIterator[worker_pb2.MigrateInChunk],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.MigrateInResult]:
        engine = self.engine
        record: MigrationRecord | None = None
        committed = False
        iterator = chunks.__aiter__()
        # The source's deadline when it sent one (grpc cancels the call then), else ours.
        client_left_s = context.time_remaining()
        lifetime_s = self.max_lifetime_s if client_left_s is None else min(client_left_s, self.max_lifetime_s)
        ends_at = time.monotonic() + lifetime_s

        def result(state: int, **extra: Any) -> worker_pb2.MigrateInResult:
            return pb.MigrateInResult(migration_id=record.migration_id if record else "", state=state,  # type: ignore[arg-type]
                                      **extra)

        async def next_chunk() -> worker_pb2.MigrateInChunk | None:
            assert record is not None
            getter = asyncio.ensure_future(iterator.__anext__())
            getter.add_done_callback(_retrieve)
            waiter = asyncio.ensure_future(record.abort_requested.wait())
            left_s = ends_at - time.monotonic()
            try:
                done, _ = await asyncio.wait({getter, waiter}, timeout=max(0.0, min(self.idle_timeout_s, left_s)),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if getter not in done:
                getter.cancel()
                if waiter in done:
                    raise MigrationAborted(pb.ABORTED_BY_REQUEST, "aborted by request at the destination")
                if left_s <= self.idle_timeout_s:
                    raise MigrationAborted(pb.TIMEOUT, f"the migration was not committed within {lifetime_s:g} s")
                raise MigrationAborted(pb.TIMEOUT, f"no message from the source within {self.idle_timeout_s:g} s")
            try:
                return getter.result()
            except StopAsyncIteration:
                return None

        try:
            try:
                first = await asyncio.wait_for(iterator.__anext__(), min(self.idle_timeout_s, lifetime_s))
            except StopAsyncIteration:
                return  # the source went away before it said anything
            except TimeoutError:
                return  # it never said anything: nothing was reserved, the stream just ends
            if first.WhichOneof("chunk") != "begin":
                raise MigrationAborted(pb.INCOMPATIBLE, "the first MigrateIn message must be begin")
            begin = first.begin
            record = MigrationRecord(begin.migration_id, begin.request_id, "destination",
                                     begin.source_instance_id, time.time_ns() // 1_000_000, state=pb.RESERVED)
            await self._fault("dest:begin", record.migration_id)
            self._check_begin(begin)
            kv = RequestKV(engine.migration_seed(begin.engine_state), engine.kv_wire_bytes_per_token,
                           engine.block_size)
            record.reserved_blocks = engine.migration_reserve(begin)
            self._remember(record)
            engine.notify_load_changed()
            yield result(pb.RESERVED, blocks_reserved=record.reserved_blocks)
            while True:
                chunk = await next_chunk()
                if chunk is None:
                    raise MigrationAborted(pb.SOURCE_UNREACHABLE, "the source ended the stream before commit")
                kind = chunk.WhichOneof("chunk")
                if kind == "abort":
                    raise MigrationAborted(chunk.abort.error or pb.ABORTED_BY_REQUEST, chunk.abort.error_message)
                if kind == "blocks":
                    self._store_blocks(kv, chunk.blocks, record)
                    if chunk.blocks.last_of_stage:
                        await self._fault("dest:stage", record.migration_id)
                        record.stage = chunk.blocks.stage
                        yield result(pb.STAGE_ACKED, stage=record.stage, blocks_received=len(kv.received))
                    continue
                if kind != "commit":
                    raise MigrationAborted(pb.INCOMPATIBLE, f"unexpected MigrateIn message {kind}")
                await self._fault("dest:commit", record.migration_id)
                commit = chunk.commit
                missing = [b for b in range(commit.blocks_total) if b not in kv.received]
                if missing or commit.context_tokens != begin.prompt_tokens + commit.tokens_generated - 1:
                    raise MigrationAborted(pb.INCOMPATIBLE, f"commit: blocks {missing[:5]} missing or context "
                                                            f"{commit.context_tokens} inconsistent")
                last = commit.blocks_total - 1
                expected_tail = commit.context_tokens - last * kv.block_size
                if len(kv.received[last]) != expected_tail * kv.bytes_per_token:
                    raise MigrationAborted(pb.INCOMPATIBLE, "commit: the last block does not cover the context")
                request_id = engine.migration_adopt(begin, commit, kv, record.reserved_blocks)
                committed = True
                record.reserved_blocks = 0
                self._finish(record, pb.COMMITTED)
                yield result(pb.COMMITTED, blocks_received=len(kv.received), destination_request_id=request_id)
                return
        except MigrationAborted as exc:
            if record is not None:
                self._free_in(record)
                self._finish(record, pb.ABORTED, exc.error, exc.message)
            yield pb.MigrateInResult(migration_id=record.migration_id if record else "", state=pb.ABORTED,
                                     error=exc.error, error_message=exc.message)  # type: ignore[arg-type]
        finally:
            if record is not None and not committed and not record.final:
                # The stream broke or was cancelled (source gone): free what was reserved.
                self._free_in(record)
                self._finish(record, pb.ABORTED, pb.SOURCE_UNREACHABLE, "the source's stream broke")

    def _free_in(self, record: MigrationRecord) -> None:
        if record.reserved_blocks:
            self.engine.migration_unreserve(record.reserved_blocks)
            record.reserved_blocks = 0

    def _check_begin(self, begin: worker_pb2.MigrateInBegin) -> None:
        engine = self.engine
        mismatch = []
        if begin.destination_instance_id != engine.instance_id:
            mismatch.append(f"destination {begin.destination_instance_id!r} is not {engine.instance_id!r}")
        if begin.model != engine.engine_model.model.name:
            mismatch.append(f"model {begin.model!r} is not {engine.engine_model.model.name!r}")
        if begin.block_size_tokens != engine.block_size:
            mismatch.append(f"block size {begin.block_size_tokens} is not {engine.block_size}")
        if begin.kv_bytes_per_token != engine.kv_wire_bytes_per_token:
            mismatch.append(f"{begin.kv_bytes_per_token} KV bytes per token, not {engine.kv_wire_bytes_per_token}")
        if begin.kv_transfer_backend != KV_BACKEND_GRPC_INLINE:
            mismatch.append(f"transfer backend {begin.kv_transfer_backend!r} is not {KV_BACKEND_GRPC_INLINE!r}")
        if len(begin.engine_state) > MAX_ENGINE_STATE_BYTES or len(begin.migration_id) > MAX_ID_CHARS:
            mismatch.append("engine_state or migration_id too large")
        if mismatch:
            raise MigrationAborted(pb.INCOMPATIBLE, "; ".join(mismatch))
        if engine.draining or not engine.running:
            raise MigrationAborted(pb.DESTINATION_DRAINING, f"{engine.instance_id} is draining")
        if self.active() >= self.max_concurrent or begin.migration_id in self.records:
            raise MigrationAborted(pb.DESTINATION_BUSY, f"{self.active()} migrations in flight "
                                                        f"(at most {self.max_concurrent})")

    @staticmethod
    def _store_blocks(kv: RequestKV, blocks: worker_pb2.KVBlocks, record: MigrationRecord) -> None:
        data = memoryview(blocks.data)
        offset = 0
        full = kv.block_size * kv.bytes_per_token
        for index, block_id in enumerate(blocks.block_ids):
            last = index == len(blocks.block_ids) - 1
            size = len(data) - offset if last else full
            piece = bytes(data[offset:offset + size])
            offset += size
            if not kv.check(block_id, piece):
                raise MigrationAborted(pb.INCOMPATIBLE, f"block {block_id}: bytes are not the request's KV "
                                                        "(corrupted or misplaced)")
            kv.received[block_id] = piece
            record.blocks_copied += 1
            record.bytes_copied += size

    # ------------------------------------------------------------ Abort / List
    def abort(self, request: worker_pb2.AbortMigrationRequest) -> worker_pb2.AbortMigrationResult:
        record = self.records.get(request.migration_id)
        if record is None:
            return pb.AbortMigrationResult(found=False)
        if record.final:
            return pb.AbortMigrationResult(found=True, aborted=False, state=record.state)  # type: ignore[arg-type]
        record.abort_requested.set()
        return pb.AbortMigrationResult(found=True, aborted=True, state=pb.ABORTED)

    def list(self, request: worker_pb2.ListMigrationsRequest) -> worker_pb2.ListMigrationsResponse:
        limit = request.max_candidates or 16
        if limit > 256:
            raise ValueError(f"ListMigrationsRequest.max_candidates: expected 0 (default 16) to 256, got {limit}")
        active = [r.info() for r in self.records.values() if not r.final]
        finished = [r.info() for r in self.records.values() if r.final][-FINISHED_KEPT:]
        response = pb.ListMigrationsResponse(migrations=[*active, *finished])
        if request.include_candidates:
            busy = {r.request_id for r in self.records.values() if not r.final}
            for cand in self.engine.migration_candidates(limit, busy):
                response.candidates.append(cand)
        return response


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a read's outcome as seen (an abort may have won the race against it)."""
    if not future.cancelled():
        future.exception()


def new_migration_id() -> str:
    return uuid.uuid4().hex
