"""The Worker gRPC service on a real grpc.aio server on loopback, over a real EngineCore,
and the router's WorkerClient turning its Status stream into InstanceState."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from router.worker_client import WorkerClient
from scheduler.catalog import default_catalog
from scheduler.engine_model import EngineModel
from scheduler.types import InstanceState
from sim.engine_core import EngineConfig, EngineCore, EngineRequest
from sim.worker_grpc import (
    EngineCoreBackend,
    EngineDescriptionInfo,
    LoadInfo,
    add_worker_servicer,
    start_worker_server,
)
from tests.conftest import free_port
from tokenyard.v1 import worker_pb2, worker_pb2_grpc

BLOCKS = 64
BLOCK_SIZE = 16
WAIT_S = 15.0  # liveness bound for "eventually"; never reached when things work


def make_core() -> EngineCore:
    catalog = default_catalog()
    model = EngineModel(catalog.gpu("A100-80GB"), catalog.model("llama-3-8b"))
    return EngineCore(model, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def served() -> AsyncIterator[tuple[EngineCoreBackend, str]]:
    backend = EngineCoreBackend(make_core(), "a100-0", labels={"pool": "a100"})
    port = free_port()
    server = await start_worker_server(backend, "127.0.0.1", port)
    yield backend, f"127.0.0.1:{port}"
    await server.stop(None)


async def read_until(
    call: grpc.aio.UnaryStreamCall, predicate: Callable[[worker_pb2.LoadSnapshot], bool]
) -> worker_pb2.LoadSnapshot:
    async def loop() -> worker_pb2.LoadSnapshot:
        while True:
            snapshot = await call.read()
            assert snapshot is not grpc.aio.EOF, "stream ended early"
            if predicate(snapshot):
                return snapshot

    return await asyncio.wait_for(loop(), WAIT_S)


async def test_describe_returns_the_engine_geometry(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        description = await worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest())
    core = backend.core
    assert description.instance_id == "a100-0"
    assert description.model == "llama-3-8b"
    assert description.gpu == "A100-80GB"
    assert description.tensor_parallel == 1
    assert description.num_kv_blocks == BLOCKS
    assert description.block_size_tokens == BLOCK_SIZE
    assert description.kv_bytes_per_token == core.model.model.kv_bytes_per_token == 131072
    assert description.max_model_len == core.max_model_len == 8192
    assert description.max_num_seqs == core.config.max_num_seqs
    assert description.engine_kind == "tokenyard-emulated"
    assert description.engine_version
    assert len(description.incarnation_id) == 32
    assert dict(description.labels) == {"pool": "a100"}


async def test_status_follows_load_changes(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    core = backend.core
    async with grpc.aio.insecure_channel(address) as channel:
        # A one-minute heartbeat: every snapshot after the first comes from a change.
        call = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(interval_ms=60_000))
        first = await read_until(call, lambda s: True)
        assert (first.running, first.waiting, first.kv_blocks_used) == (0, 0, 0)
        assert first.kv_blocks_total == BLOCKS and first.block_size_tokens == BLOCK_SIZE
        assert first.instance_id == "a100-0" and first.sequence >= 1
        assert first.incarnation_id == backend.describe().incarnation_id

        for i in range(3):
            backend.add_request(EngineRequest(f"r{i}", prompt_tokens=100, output_tokens=20))
        queued = await read_until(call, lambda s: s.waiting == 3)
        assert queued.running == 0 and queued.kv_blocks_used == 0
        assert queued.sequence > first.sequence

        backend.schedule()  # admits all three: 7 blocks each for 100 prompt tokens
        admitted = await read_until(call, lambda s: s.running == 3)
        assert admitted.waiting == 0
        assert admitted.kv_blocks_used == core.kv_blocks_used == 3 * 7
        assert admitted.tokens_in_flight == core.tokens_in_flight == 300
        assert admitted.prefix_cache_hit_tokens_total == core.prefix_cache_hits_tokens

        backend.set_draining(True)
        drained = await read_until(call, lambda s: s.draining)
        assert drained.running == 3
        call.cancel()


async def test_a_burst_of_changes_is_coalesced(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(interval_ms=60_000))
        first = await read_until(call, lambda s: True)
        # 40 changes without yielding to the event loop: the server sees them as one.
        for i in range(40):
            backend.add_request(EngineRequest(f"b{i}", prompt_tokens=16, output_tokens=4))
        after = await read_until(call, lambda s: True)
        assert after.waiting == 40
        assert after.sequence == first.sequence + 1
        call.cancel()


async def test_heartbeats_respect_the_interval(served: tuple[EngineCoreBackend, str]) -> None:
    _, address = served
    interval_s = 0.05
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        started = time.monotonic()
        call = stub.Status(worker_pb2.StatusRequest(interval_ms=int(interval_s * 1000)))
        sequences = []
        for _ in range(5):
            snapshot = await read_until(call, lambda s: True)
            sequences.append(snapshot.sequence)
        elapsed_s = time.monotonic() - started
        call.cancel()
    assert sequences == sorted(set(sequences))
    # Without load changes, five snapshots need at least four intervals between them;
    # a slow machine only makes the elapsed time longer, never shorter.
    assert elapsed_s >= 4 * interval_s


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval_ms", 5), ("interval_ms", 60_001), ("min_change_interval_ms", 9), ("min_change_interval_ms", 70_000)],
)
async def test_bad_interval_is_invalid_argument(
    served: tuple[EngineCoreBackend, str], field: str, value: int
) -> None:
    _, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(**{field: value}))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert f"StatusRequest.{field}:" in details and str(value) in details


async def test_min_change_interval_bounds_the_snapshot_rate(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    min_change_s = 0.1
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Status(
            worker_pb2.StatusRequest(interval_ms=60_000, min_change_interval_ms=int(min_change_s * 1000))
        )
        await read_until(call, lambda s: True)
        started = time.monotonic()
        received = 0

        async def reader() -> None:
            nonlocal received
            while (await call.read()) is not grpc.aio.EOF:
                received += 1

        reading = asyncio.ensure_future(reader())
        # A change every few ms, as a busy engine makes them, for 40 changes.
        for i in range(40):
            backend.add_request(EngineRequest(f"m{i}", prompt_tokens=16, output_tokens=4))
            await asyncio.sleep(0.005)
        await until(lambda: received >= 1, "a change-triggered snapshot")
        elapsed_s = time.monotonic() - started
        call.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    # Snapshots after the first are at least min_change_s apart; a slow machine only
    # lowers the count.
    assert 1 <= received <= elapsed_s / min_change_s + 1


async def test_cancel_and_close_end_streams_on_the_server() -> None:
    backend = EngineCoreBackend(make_core(), "a100-1")
    server = grpc.aio.server()
    servicer = add_worker_servicer(server, backend)
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Status(worker_pb2.StatusRequest(interval_ms=20))
            await read_until(call, lambda s: True)
            assert servicer.open_streams == 1
            call.cancel()
            await until(lambda: servicer.open_streams == 0, "the server to notice the cancel")

            # close(): every open stream ends with status OK.
            calls = [stub.Status(worker_pb2.StatusRequest(interval_ms=20)) for _ in range(2)]
            for c in calls:
                await read_until(c, lambda s: True)
            servicer.close()
            for c in calls:
                while (message := await asyncio.wait_for(c.read(), WAIT_S)) is not grpc.aio.EOF:
                    assert message.instance_id == "a100-1"
                assert await c.code() == grpc.StatusCode.OK
            assert servicer.open_streams == 0
    finally:
        await server.stop(None)


async def test_server_stop_ends_the_stream() -> None:
    backend = EngineCoreBackend(make_core(), "a100-2")
    port = free_port()
    server = await start_worker_server(backend, "127.0.0.1", port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(interval_ms=20))
        await read_until(call, lambda s: True)
        await server.stop(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_until(call, lambda s: False)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_start_on_a_bad_address_says_which() -> None:
    backend = EngineCoreBackend(make_core(), "a100-3")
    port = free_port()
    first = await start_worker_server(backend, "127.0.0.1", port)
    try:
        # grpc sets SO_REUSEPORT, so binding a busy port may succeed; a host that does
        # not resolve always fails, and the error must name the address.
        with pytest.raises(OSError, match="no-such-host.invalid"):
            # (with a token: without one a non-loopback host is refused before binding)
            await start_worker_server(backend, "no-such-host.invalid", port, token="t" * 32)
    finally:
        await first.stop(None)


# ---------------------------------------------------------------- router client


async def test_client_turns_snapshots_into_instance_state(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    core = backend.core
    state = InstanceState(instance_id="a100-0", model="unknown", url="http://127.0.0.1:1", router_inflight=7)
    updates: list[tuple[int, int, int]] = []
    client = WorkerClient(
        address, state, interval_ms=50, on_update=lambda s: updates.append((s.running, s.waiting, s.kv_blocks_used))
    )
    client.start()
    try:
        await until(lambda: client.connected, "the client to connect")
        assert state.model == "llama-3-8b" and state.gpu == "A100-80GB" and state.tp == 1
        assert state.kv_blocks_total == BLOCKS and state.block_size_tokens == BLOCK_SIZE
        assert client.description is not None and client.description.num_kv_blocks == BLOCKS

        for i in range(5):
            backend.add_request(EngineRequest(f"c{i}", prompt_tokens=200, output_tokens=50, priority=i % 2 * 2))
        backend.schedule()
        await until(lambda: state.running == core.num_running and state.waiting == core.num_waiting
                    and state.kv_blocks_used == core.kv_blocks_used, "the state to match the core")
        # KV room for 64 blocks: 13 blocks per 200-token prompt admits 4, queues 1.
        assert (state.running, state.waiting, state.kv_blocks_used) == (4, 1, 52)
        assert state.tokens_in_flight == core.tokens_in_flight == 800
        # The queued demand travels too: the one waiting 200-token prompt needs 13 blocks.
        assert state.kv_blocks_queued == core.waiting_blocks == 13
        # So do the running requests per priority class (the priority headroom's count):
        # c0 and c2 of priority 0, c1 and c3 of priority 2; c4 waits.
        assert state.running_by_priority == core.running_by_priority == ((0, 2), (2, 2))
        assert state.kv_usage == pytest.approx(52 / 64)
        assert state.router_inflight == 7  # the router's own count is not overwritten
        assert state.outstanding == 7
        assert state.healthy and state.updated_s > 0
        assert (4, 1, 52) in updates
    finally:
        await client.stop()
    assert client.connections == 1  # one stream all along, no reconnection


async def test_client_as_async_iterator_and_describe(served: tuple[EngineCoreBackend, str]) -> None:
    backend, address = served
    client = WorkerClient(address, interval_ms=20)
    description = await client.describe()
    assert description.instance_id == "a100-0"
    seen: list[int] = []
    async for state in client.updates():
        assert state.healthy and state.kv_blocks_total == BLOCKS
        seen.append(client.last_sequence)
        if len(seen) == 3:
            await client.stop()
    assert client.state is not None and client.state.instance_id == "a100-0"
    assert seen == sorted(set(seen))


async def test_client_reconnects_after_the_server_restarts() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = EngineCoreBackend(make_core(), "a100-9")
    server = await start_worker_server(first, "127.0.0.1", port)
    state = InstanceState(instance_id="a100-9", model="llama-3-8b")
    health: list[bool] = []
    client = WorkerClient(
        address, state, interval_ms=50, backoff_initial_s=0.02, backoff_max_s=0.2,
        on_update=lambda s: health.append(s.healthy),
    )
    client.start()
    try:
        await until(lambda: client.connected, "the first connection")
        first_incarnation = client.description.incarnation_id if client.description else ""
        await server.stop(None)
        await until(lambda: not state.healthy, "the loss to be noticed")
        assert not client.connected

        # A restarted engine: same port, new incarnation, with load already queued.
        second = EngineCoreBackend(make_core(), "a100-9")
        second.add_request(EngineRequest("after-restart-0", prompt_tokens=32, output_tokens=8))
        second.add_request(EngineRequest("after-restart-1", prompt_tokens=32, output_tokens=8))
        server = await start_worker_server(second, "127.0.0.1", port)
        await until(lambda: state.healthy and state.waiting == 2, "the reconnection")
        assert client.connections == 2
        assert client.description is not None and client.description.incarnation_id != first_incarnation
        assert client.description.incarnation_id == second.describe().incarnation_id
        assert True in health and False in health and health[-1] is True
    finally:
        await client.stop()
        await server.stop(None)


class HungBackend:
    """A WorkerBackend whose load never changes and whose stream stalls after one snapshot:
    what a wedged engine looks like to the router."""

    def __init__(self) -> None:
        self.calls = 0
        self.description = EngineDescriptionInfo(
            instance_id="hung", model="llama-3-8b", gpu="L4", tensor_parallel=1, num_kv_blocks=10,
            block_size_tokens=16, kv_bytes_per_token=1, max_model_len=1024, engine_kind="test",
            engine_version="0", incarnation_id="x",
        )

    def describe(self) -> EngineDescriptionInfo:
        return self.description

    def load(self) -> LoadInfo:
        return LoadInfo(running=1, waiting=0, kv_blocks_used=2, kv_blocks_total=10, block_size_tokens=16,
                        tokens_in_flight=20)

    async def changed(self, seen_version: int, timeout_s: float) -> int:
        self.calls += 1
        if seen_version == -1:
            return 0
        await asyncio.Event().wait()  # hangs until the stream is cancelled
        return 0


async def test_client_drops_a_silent_stream_and_reconnects() -> None:
    backend = HungBackend()
    port = free_port()
    server = await start_worker_server(backend, "127.0.0.1", port)
    state = InstanceState(instance_id="hung", model="llama-3-8b")
    client = WorkerClient(
        f"127.0.0.1:{port}", state, interval_ms=20, stale_after_s=0.2, backoff_initial_s=0.02, backoff_max_s=0.05
    )
    client.start()
    try:
        await until(lambda: client.connections >= 3, "two reconnections after silent streams")
        assert state.kv_blocks_used == 2 and state.gpu == "L4"
        assert state.kv_blocks_queued is None  # a backend that does not know it leaves it unset
        assert state.running_by_priority is None  # the same for the priority counts
    finally:
        await client.stop()
        await server.stop(None)


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="host:port"):
        WorkerClient("localhost")
    with pytest.raises(ValueError, match="interval_ms"):
        WorkerClient("127.0.0.1:1", interval_ms=5)


async def test_status_streams_past_the_cap_are_refused() -> None:
    """A caller holding Status streams open cannot grow the engine's fan-out without bound:
    past `max_status_streams` a new stream is RESOURCE_EXHAUSTED; one closes, one opens."""
    backend = EngineCoreBackend(make_core(), "a100-1")
    server = grpc.aio.server()
    servicer = add_worker_servicer(server, backend)
    servicer.max_status_streams = 2
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            held = [stub.Status(worker_pb2.StatusRequest(interval_ms=20)) for _ in range(2)]
            for call in held:
                await read_until(call, lambda s: True)
            refused = stub.Status(worker_pb2.StatusRequest(interval_ms=20))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(refused.read(), WAIT_S)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 2" in (err.value.details() or "")
            assert servicer.open_streams == 2
            held[0].cancel()
            await until(lambda: servicer.open_streams == 1, "the server to notice the cancel")
            again = stub.Status(worker_pb2.StatusRequest(interval_ms=20))
            await read_until(again, lambda s: True)
            assert servicer.open_streams == 2
            for call in (held[1], again):
                call.cancel()
    finally:
        await server.stop(None)
