"""Property-based fuzzing (hypothesis) of every parser a hostile peer reaches.

- HTTP framing of the front door: mutated and random requests over real sockets;
- request JSON: arbitrary JSON documents as chat and completions bodies;
- SSE and JSON answers from engines: arbitrary bytes from a scripted engine;
- Prometheus text from engines (router.load.parse_vllm_metrics);
- traces (sim.traces.read_trace) from arbitrary file contents;
- the admin API: arbitrary field values in RegisterInstance and PutPolicy.
Target: no 500 from our own code, no traceback to the client, the server still answering,
only the parser's documented error type. Example counts are bounded (seconds per test).
"""

from __future__ import annotations

import asyncio
import logging
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.admin_grpc import start_control_server
from router.app import Router
from router.auth import ControlAuth, Principal, TokenTable, control_channel, token_digest
from router.config import parse_router_config
from router.http_server import RouterServer
from router.load import EngineLoad, parse_vllm_metrics
from router.registry import InstanceRegistry
from scheduler.types import Decision
from sim.traces import TraceError, read_trace
from tests.test_hostile_support import LoopThread, ScriptedEngine, exchange, post, status_of
from tokenyard.v1 import admin_pb2, admin_pb2_grpc

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
OK_STATUSES = {200, 400, 401, 404, 405, 408, 413, 414, 431, 502, 503, 504}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of our loggers during this module's tests."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("router", "tokenyard", "sim")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


class Served:
    """A router (with a scripted engine whose answer a test can set) in a loop thread."""

    def __init__(self) -> None:
        self.thread = LoopThread()
        self.engine = ScriptedEngine()
        self.server: RouterServer | None = None

        async def start() -> None:
            await self.engine.start()
            router = Router(parse_router_config({"deadlines_ms": {"default": 2000}}, "fuzz.yaml"))
            await router.start(background=False)
            router.registry.upsert(self.engine.record())
            self.server = RouterServer(router, "127.0.0.1", 0)
            await self.server.start()

        self.thread.run(start())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def alive(self) -> bool:
        return status_of(exchange(self.port, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")) == 200

    def close(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            await self.server.stop(0.5)
            await self.engine.stop()

        self.thread.run(stop())
        self.thread.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    target = Served()
    yield target
    target.close()


def _no_500(reply: bytes) -> None:
    code = status_of(reply)
    assert code is None or code in OK_STATUSES, reply[:400]
    assert b"Traceback" not in reply and b'File "' not in reply


# -- HTTP framing -------------------------------------------------------------------------------
VALID = post("/v1/completions", b'{"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}', b"Connection: close\r\n")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=0, max_size=8)), min_size=1,
                max_size=6))
def test_mutated_requests_never_get_a_500(served: Served, edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(VALID)
    for at, replacement in edits:
        data[at:at + len(replacement)] = replacement
    _no_500(exchange(served.port, bytes(data), quiet_s=0.3, total_s=3, half_close=True))


@FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_random_bytes_never_get_a_500_and_the_server_stays_up(served: Served, data: bytes) -> None:
    _no_500(exchange(served.port, data, quiet_s=0.2, total_s=3, half_close=True))


def test_the_server_is_still_up_after_the_framing_fuzz(served: Served) -> None:
    assert served.alive()
    assert served.server is not None and len(served.server.connections) < 20  # nothing held open


# -- request JSON ------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)
request_docs = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["llama-3-8b", "LLAMA-3-8B", "", "other"]) | json_values,
    "prompt": json_values, "messages": json_values, "max_tokens": json_values, "stream": json_values,
    "stream_options": json_values, "n": json_values, "priority": json_values, "user": json_values,
}) | json_values


@FUZZ
@given(request_docs, st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_any_json_body_gets_a_clean_answer(served: Served, doc: Any, path: str) -> None:
    served.engine.behaviour = _echo_ok
    body = orjson.dumps(doc)
    reply = exchange(served.port, post(path, body, b"Connection: close\r\n"), quiet_s=0.5, total_s=5)
    _no_500(reply)
    assert status_of(reply) is not None
    if status_of(reply) != 200:
        error = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert isinstance(error["message"], str) and error["type"]


async def _echo_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    body = b'{"id":"x","object":"text_completion","choices":[{"text":"ok"}]}'
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()


# -- what engines answer -------------------------------------------------------------------------
sse_events = st.lists(st.one_of(
    st.builds(lambda d: b"data: " + orjson.dumps(d) + b"\n\n", json_values),
    st.just(b"data: [DONE]\n\n"), st.just(b'data: {"object": "error", "message": "boom", "code": 500}\n\n'),
    st.binary(max_size=64)), max_size=8)


@FUZZ
@given(sse_events, st.booleans(), st.sampled_from([200, 400, 500, 503]))
def test_any_engine_answer_is_relayed_cleanly(served: Served, events: list[bytes], chunked: bool,
                                              engine_status: int) -> None:
    payload = b"".join(events)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-type: text/event-stream\r\n" % engine_status
        if chunked:
            writer.write(head + b"transfer-encoding: chunked\r\n\r\n"
                         + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events if e) + b"0\r\n\r\n")
        else:
            writer.write(head + b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()

    served.engine.behaviour = answer
    for stream in (True, False):
        body = orjson.dumps({"model": "llama-3-8b", "prompt": "p", "max_tokens": 2, "stream": stream})
        reply = exchange(served.port, post("/v1/completions", body, b"Connection: close\r\n"), quiet_s=4, total_s=8)
        code = status_of(reply)
        assert code is not None, reply[:200]
        assert code != 500 or engine_status == 500, reply[:300]  # a 500 only as the engine's own, relayed
        assert b"Traceback" not in reply


@FUZZ
@given(st.binary(max_size=512))
def test_garbage_instead_of_http_from_an_engine_is_a_502(served: Served, garbage: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        writer.write(garbage)
        await writer.drain()
        writer.close()

    served.engine.behaviour = answer
    body = b'{"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}'
    reply = exchange(served.port, post("/v1/completions", body, b"Connection: close\r\n"), quiet_s=4, total_s=8)
    _no_500(reply)
    assert status_of(reply) in {200, 400, 404, 502, 503, 504} or status_of(reply) is not None


prometheus_lines = st.lists(st.one_of(
    st.builds(lambda name, value: f"{name} {value}", st.sampled_from([
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", 'vllm:num_requests_running{model_name="m"}']),
        st.one_of(st.floats(), st.text(max_size=6), st.integers()).map(str)),
    st.builds(lambda blocks, size: f'vllm:cache_config_info{{num_gpu_blocks="{blocks}",block_size="{size}"}} 1.0',
              st.text(max_size=8), st.text(max_size=4)),
    st.text(max_size=60)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(prometheus_lines)
def test_prometheus_text_from_engines_never_breaks_the_parser(lines: list[str]) -> None:
    load = parse_vllm_metrics("\n".join(lines))
    assert isinstance(load, EngineLoad)
    for value in (load.running, load.waiting, load.kv_blocks_total):
        assert value is None or value >= 0
    assert load.kv_usage is None or load.kv_usage >= 0


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["arrival_s,input_tokens,output_tokens\n", "TIMESTAMP,ContextTokens,GeneratedTokens\n",
                        '{"timestamp": 1, "input_length": 3, "output_length": 4}\n', ""]),
       st.text(max_size=300), st.sampled_from(["csv", "jsonl"]))
def test_traces_give_rows_or_a_trace_error(header: str, rest: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t.{suffix}"
        path.write_text(header + rest, encoding="utf-8")
        try:
            for request in read_trace(path):
                assert request.input_tokens >= 0 and request.output_tokens >= 0
        except TraceError as exc:
            assert str(path) in str(exc)


# -- the admin API ----------------------------------------------------------------------------
ADMIN_TOKEN = "fuzz-admin-token-0123456789"
short_text = st.text(alphabet=string.printable + "\u00e9\u4e2d\x00", max_size=40)


@pytest.fixture(scope="module")
def admin() -> Iterator[tuple[LoopThread, Any, Any]]:
    thread = LoopThread()

    async def start() -> tuple[Any, Any, Any]:
        registry = InstanceRegistry()
        await registry.start()

        async def decide(info: Any) -> Decision:
            return Decision(instance_ids=())

        server = await start_control_server(
            "127.0.0.1", 0, registry=registry, store=None, decide=decide,
            auth=ControlAuth.with_tokens(TokenTable([(token_digest(ADMIN_TOKEN), Principal("fuzz"))])))
        channel = control_channel(f"127.0.0.1:{server.bound_port}", ADMIN_TOKEN)
        return server, channel, admin_pb2_grpc.AdminStub(channel)

    server, channel, stub = thread.run(start())
    yield thread, stub, server
    thread.run(channel.close())
    thread.run(server.stop(0))
    thread.close()


@FUZZ
@given(short_text, short_text, short_text, short_text, st.integers(0, 2**32 - 1), short_text)
def test_admin_registration_fields_get_a_status_never_an_exception(
        admin: tuple[LoopThread, Any, Any], instance_id: str, url: str, model: str, worker: str, tp: int,
        pool: str) -> None:
    thread, stub, _ = admin
    request = admin_pb2.RegisterInstanceRequest(instance=admin_pb2.InstanceRegistration(
        instance_id=instance_id, url=url, model=model, worker_address=worker, tensor_parallel=tp, pool=pool))

    async def call() -> grpc.StatusCode:
        try:
            await stub.RegisterInstance(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    code = thread.run(call())
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}, code


@FUZZ
@given(short_text, short_text, st.floats(), st.floats(), st.integers(-2**31, 2**31 - 1), short_text)
def test_admin_policy_fields_get_a_status_never_an_exception(
        admin: tuple[LoopThread, Any, Any], tenant: str, slo_class: str, ttft: float, tpot: float, priority: int,
        policy: str) -> None:
    thread, stub, _ = admin
    request = admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(
        tenant=tenant, slo_class=slo_class, ttft_slo_ms=ttft, tpot_slo_ms=tpot, priority=priority,
        dispatch_policy=policy))

    async def call() -> grpc.StatusCode:
        try:
            await stub.PutPolicy(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    # No store in this server: a valid policy reaches it and is UNAVAILABLE; the rest are refused.
    code = thread.run(call())
    assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}, code


def test_no_exception_was_logged_by_the_fuzzed_servers(errors_logged: list[logging.LogRecord]) -> None:
    """Run last in this file: an exception in our code would have been logged at ERROR."""
    assert not errors_logged, [(r.name, r.getMessage(), logging.Formatter().formatException(r.exc_info))
                               for r in errors_logged if r.exc_info]
