"""What the request records (router/records.py) cost per request, against records off.

1. The hook on the event loop: an answered request's `send` calls through the detailed
   `UsageMeter` and the `RequestRecords.answered` call (capture, queue), against the same
   `send` calls through the plain meter the workload histogram uses (records off), for a
   non-streamed answer and a 64-event stream without a usage block; ns per request and the
   ratio, with the writer thread stopped so that only the loop's share is timed. Then the
   writer thread's work for those records (build, serialise, append), ns per record.
2. End to end: two `tokenyard router` processes, records off and on, in front of the
   zero-latency fake engine (bench/peers/fake_engine.py), the same requests (non-streamed,
   and 64-token streams) from 8 concurrent clients over loopback HTTP, in alternating
   rounds: the router process's CPU time per request (/proc, so the time other work on
   the box takes is not counted), median over the rounds, and the ratio.
3. Beside 1: what the stdlib's logging queue and rotating file handler cost the caller's
   thread for the same records (why router/records.py has a writer of its own).

    python bench/records_cost.py              # ~30 s
    python bench/records_cost.py --rounds 2 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def _sink(message: Any) -> None:
    return None


def _messages(chunks: int, sends: int = 0) -> list[dict[str, Any]]:
    """A non-streamed answer (chunks 0) or a stream of `chunks` events, one send each, or
    coalesced into `sends` sends (as the relay often hands them on)."""
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"ty-1"),
                         (b"x-tokenyard-instance", b"e0")]}
    if chunks == 0:
        body = (b'{"id": "x", "choices": [{"message": {"role": "assistant", "content": "' + b"y" * 400
                + b'"}}], "usage": {"prompt_tokens": 812, "completion_tokens": 64, "total_tokens": 876}}')
        return [start, {"type": "http.response.body", "body": body}]
    chunk = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
    if sends:
        per = -(-chunks // sends)
        bodies = [chunk * min(per, chunks - i * per) for i in range(sends)]
        bodies[-1] += b"data: [DONE]\n\n"
        return [start, *({"type": "http.response.body", "body": b, "more_body": True} for b in bodies)]
    return [start, *({"type": "http.response.body", "body": chunk, "more_body": True} for _ in range(chunks)),
            {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True}]


class _FakeRouter:
    """What `RequestRecords.answered` reads of a router: its registry and ranker."""

    def __init__(self) -> None:
        from router.registry import InstanceRegistry
        from router.state import InstanceRecord

        self.registry = InstanceRegistry(None)
        self.registry.upsert(InstanceRecord("e0", "http://127.0.0.1:9", "llama-3-8b", gpu="A100-80GB"))
        self.ranker = None


async def hook_cost(requests: int, chunks: int, sends: int = 0) -> dict[str, float]:
    """ns per request: the `send` calls through the plain meter (records off), through the
    detailed meter plus `RequestRecords.answered` (records on: what the event loop pays),
    and the writer thread's work for those records (build, serialise, append)."""
    from prometheus_client import CollectorRegistry

    from router.records import RecordsSettings, RequestRecords
    from router.tenants import Tenant
    from router.workload_recorder import UsageMeter
    from scheduler.types import RequestInfo

    router = _FakeRouter()
    info = RequestInfo("ty-1", "llama-3-8b", 812, max_output_tokens=64)
    tenant = Tenant("acme", "default")
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
    messages = _messages(chunks, sends)
    with tempfile.TemporaryDirectory() as tmp:
        settings = RecordsSettings(str(Path(tmp) / "r.jsonl"), queue_max=requests * 8)
        records = RequestRecords(settings, CollectorRegistry(), slo_targets_s=lambda _: (3.0, 0.2))
        records.close()  # the writer thread stops: what `answered` queues stays queued, and the loop's share is alone

        async def plain() -> float:
            t0 = time.perf_counter()
            for _ in range(requests):
                meter = UsageMeter(_sink)
                for m in messages:
                    await meter(m)
                meter.usage()
            return time.perf_counter() - t0

        async def detailed() -> float:
            t0 = time.perf_counter()
            for _ in range(requests):
                meter = UsageMeter(_sink, detail=True, inflight_of=lambda _: 1)
                for m in messages:
                    await meter(m)
                meter.usage()
                # 64-event case: no usage block (a client not asking for one), so the writer
                # counts the events (meter.output_tokens), the costlier case.
                records.answered(router, info, tenant, meter, time.monotonic(), body, chunks > 0, False)
            return time.perf_counter() - t0

        off, on = [], []
        for _ in range(4):
            off.append(await plain())
            on.append(await detailed())
            if len(records.writer._pending) > requests:  # keep the last pass only, for the writer's share
                for _ in range(requests):
                    records.writer._pending.popleft()
        writer = RequestRecords(settings, CollectorRegistry(), slo_targets_s=lambda _: (3.0, 0.2)).writer
        pending = list(records.writer._pending)
        t0 = time.perf_counter()
        for item in pending:
            writer.submit(item)
        writer.close(timeout_s=60)
        writer_s = time.perf_counter() - t0
    per = 1e9 / requests
    return {"off_ns": min(off) * per, "on_ns": min(on) * per, "ratio": min(on) / min(off),
            "writer_ns": writer_s / len(pending) * 1e9}


def writer_cost(records: int) -> float:
    """ns per record of the writer thread alone (serialise + append), one batch after another."""
    from prometheus_client import CollectorRegistry

    from router.records import RecordsMetrics, RecordsSettings, RecordWriter

    row = {"request_id": "ty-1", "tenant": "acme", "slo_class": "default", "model": "llama-3-8b", "pool": "a100",
           "instance_id": "e0", "gpu": "A100-80GB", "arrival_s": time.time(), "dispatch_s": time.time(),
           "first_token_s": time.time(), "finish_s": time.time(), "input_tokens": 812, "output_tokens": 64,
           "cached_prompt_tokens": 0, "preemptions": 0, "rejected": False, "reject_reason": "", "ttft_slo_s": 3.0,
           "tpot_slo_s": 0.2, "ttft_ms": 12.5, "tpot_ms": 10.1, "e2e_ms": 650.0, "status": 200, "stream": True,
           "max_tokens": 64, "instance_inflight": 3, "output_tokens_from": "usage", "feature_spec": 2,
           "dense": [0.5] * 30}
    with tempfile.TemporaryDirectory() as tmp:
        writer = RecordWriter(RecordsSettings(str(Path(tmp) / "r.jsonl"), queue_max=records + 10),
                              RecordsMetrics(CollectorRegistry()))
        t0 = time.perf_counter()
        for _ in range(records):
            writer.submit(row)
        writer.close(timeout_s=60)
        return (time.perf_counter() - t0) / records * 1e9


def stdlib_cost(records: int) -> tuple[float, float]:
    """(ns per record on the caller's thread, ns per record in all) for what the stdlib
    offers: a logger with a `QueueHandler` on a bounded queue and a `QueueListener` writing
    through a `RotatingFileHandler` whose formatter serialises the record with orjson. The
    record dict is built on the caller's thread (the handler formats there, in `prepare`)."""
    import logging
    import logging.handlers
    import queue

    import orjson

    from router.records import RecordsSettings, RequestRecords

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return orjson.dumps(record.msg).decode()

    with tempfile.TemporaryDirectory() as tmp:
        sink = logging.handlers.RotatingFileHandler(f"{tmp}/r.jsonl", maxBytes=100 << 20, backupCount=3)
        sink.setFormatter(JsonFormatter())
        pending: queue.Queue[Any] = queue.Queue(maxsize=records + 10)
        handler = logging.handlers.QueueHandler(pending)
        handler.setFormatter(JsonFormatter())
        logger = logging.getLogger("bench.records.stdlib")
        logger.propagate = False
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        listener = logging.handlers.QueueListener(pending, sink)
        listener.start()
        from prometheus_client import CollectorRegistry

        builder = RequestRecords(RecordsSettings(f"{tmp}/unused.jsonl"), CollectorRegistry(),
                                 slo_targets_s=lambda _: (3.0, 0.2))
        item = (time.time(), time.monotonic(), time.monotonic(), "ty-1", "acme", "default", "llama-3-8b", 812, 64,
                False, 200, ("e0", "default", "A100-80GB"), None, None, 1, "", None, None)
        t0 = time.perf_counter()
        for _ in range(records):
            logger.info(builder._build(item))
        caller_s = time.perf_counter() - t0
        listener.stop()
        total_s = time.perf_counter() - t0
        builder.close()
        sink.close()
    return caller_s / records * 1e9, total_s / records * 1e9


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _router_process(tmp: str, name: str, engine_url: str, records: bool) -> tuple[subprocess.Popen[bytes], str]:
    import yaml

    from tests.conftest import free_port

    port = free_port()
    doc: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": port}, "store": f"file://{tmp}/{name}.db",
                           "discovery": {"static": [{"id": "e0", "url": engine_url, "model": "llama-3-8b",
                                                     "gpu": "A100-80GB"}]}}
    if records:
        doc["records"] = {"path": f"{tmp}/{name}-records.jsonl"}
    config = Path(tmp) / f"{name}.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-c", "from cli.main import main; raise SystemExit(main())", "router",
                             "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def end_to_end(rounds: int, requests: int, concurrency: int, a_a: bool = False) -> dict[str, dict[str, float]]:
    """Router CPU per request (its own process, records off and on), rounds alternating.
    `a_a`: both routers with records off (the noise floor of the comparison)."""
    import httpx

    from tests.test_router_support import FakeEngine

    engine = FakeEngine()
    results: dict[str, dict[str, list[float]]] = {"plain": {"off": [], "on": []}, "stream": {"off": [], "on": []}}
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for mode in ("off", "on"):
                procs[mode] = _router_process(tmp, mode, engine.url, mode == "on" and not a_a)
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
                for _, url in procs.values():
                    for _ in range(200):
                        with contextlib.suppress(httpx.HTTPError):
                            if (await client.get(url + "/health")).status_code == 200:
                                break
                        await asyncio.sleep(0.1)

                async def run(mode: str, stream: bool, count: int) -> float:
                    proc, url = procs[mode]
                    body = {"model": "llama-3-8b", "max_tokens": 64, "stream": stream,
                            "messages": [{"role": "user", "content": "hello there"}]}

                    async def worker(n: int) -> None:
                        for _ in range(n):
                            async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                                async for _ in reply.aiter_bytes():
                                    pass

                    before = _cpu_s(proc.pid)
                    await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
                    return (_cpu_s(proc.pid) - before) / (count // concurrency * concurrency)

                for stream in (False, True):
                    for mode in ("off", "on"):
                        await run(mode, stream, requests // 4)  # warm up
                for index in range(rounds):
                    for stream in (False, True):
                        for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                            results["stream" if stream else "plain"][mode].append(await run(mode, stream, requests))
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            engine.kill()
    out = {}
    for kind, modes in results.items():
        off, on = statistics.median(modes["off"]), statistics.median(modes["on"])
        out[kind] = {"off_us": off * 1e6, "on_us": on * 1e6, "ratio": on / off,
                     "rounds": [round(b / a, 3) for a, b in zip(modes["off"], modes["on"], strict=True)]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook-requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=800, help="requests per round and router")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--a-a", action="store_true", help="part 2 with records off in both routers (noise floor)")
    parser.add_argument("--only-e2e", action="store_true", help="part 2 only")
    args = parser.parse_args()
    if not args.only_e2e:
        hook_report(args)
    print(f"2. a router process in front of the fake engine, {args.concurrency} clients: its CPU per request, us "
          "(median of the rounds)" + (" -- A/A: records off in both" if args.a_a else ""))
    for kind, r in asyncio.run(end_to_end(args.rounds, args.requests, args.concurrency, args.a_a)).items():
        print(f"   {kind:<7} records off {r['off_us']:8.1f}  on {r['on_us']:8.1f}  added {r['on_us'] - r['off_us']:6.1f}"
              f"  ratio {r['ratio']:.3f}  (per round {r['rounds']})")
    return 0


def hook_report(args: argparse.Namespace) -> None:
    print("1. the hook on the event loop (records on vs the workload meter alone), ns per request")
    for chunks, sends in ((0, 0), (64, 0), (64, 3)):
        r = asyncio.run(hook_cost(args.hook_requests, chunks, sends))
        kind = "non-streamed" if chunks == 0 else f"{chunks}-event stream" + (f", {sends} sends" if sends else "")
        print(f"   {kind:<26} off {r['off_ns']:8.0f}  on {r['on_ns']:8.0f}  added on the loop "
              f"{r['on_ns'] - r['off_ns']:7.0f} (ratio {r['ratio']:.2f});  writer thread {r['writer_ns']:7.0f}")
    print(f"   writer thread, serialise + append of built records only: {writer_cost(args.hook_requests):.0f} ns each")
    caller_ns, total_ns = stdlib_cost(args.hook_requests)
    print(f"   the stdlib way (QueueHandler + QueueListener + RotatingFileHandler, record built by the caller): "
          f"{caller_ns:.0f} ns per record on the caller's thread, {total_ns:.0f} in all")


if __name__ == "__main__":
    raise SystemExit(main())
