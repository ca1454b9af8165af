"""Cross-check of the simulator against the live system.

The same workload is replayed twice: through real emulated engines over HTTP on the real
clock (each request a streaming completion sent at its arrival time, TTFT and TPOT
measured by the client from the SSE chunks), and through the simulator with the same
cluster. Both runs produce `sim.records.RequestRecord`s, so the same percentile code
compares them. The simulator is trustworthy to the extent these agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from sim.cluster import ClusterSpec
from sim.records import RequestRecord
from sim.workload import TraceRequest

# The SSE data line of a completion chunk always carries `"choices":[{...` with text;
# the usage-only chunk has an empty choices list, and `[DONE]` ends the stream.
_DONE = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One live engine the replay may send to, with the model name it serves."""

    instance_id: str
    base_url: str
    model: str


async def _one_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    request: TraceRequest,
    start_wall_s: float,
) -> RequestRecord:
    delay = start_wall_s + request.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic()
    salt = zlib.crc32(request.request_id.encode()) % 30000
    body = {
        "model": endpoint.model,
        # A prompt of token ids is counted exactly by the emulated engine (and by vLLM).
        # Distinct per request, so no prefix-cache hits that the trace does not have.
        "prompt": [1000 + (salt + i) % 30000 for i in range(request.input_tokens)],
        "max_tokens": request.output_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    first: float | None = None
    last: float | None = None
    chunks = 0
    async with client.stream("POST", f"{endpoint.base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"request {request.request_id}: HTTP {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line.encode() == _DONE:
                continue
            if '"text":' not in line:
                continue
            now = time.monotonic()
            if first is None:
                first = now
            last = now
            chunks += 1
    return RequestRecord(
        request_id=request.request_id,
        tenant=request.tenant,
        slo_class=request.slo_class,
        model=endpoint.model,
        pool="live",
        instance_id=endpoint.instance_id,
        gpu="",
        arrival_s=sent - start_wall_s,
        dispatch_s=sent - start_wall_s,
        first_token_s=None if first is None else first - start_wall_s,
        finish_s=None if last is None else last - start_wall_s,
        input_tokens=request.input_tokens,
        output_tokens=chunks,
    )


async def replay_live(
    endpoints: Sequence[Endpoint],
    requests: Sequence[TraceRequest],
    assignment: dict[str, str] | None = None,
) -> list[RequestRecord]:
    """Send each request at its arrival time to its endpoint; return client-side records.

    `assignment` maps request id to instance id (e.g. the simulator's decisions, so that
    both runs place requests identically); without it, requests go round-robin.
    """
    by_id = {e.instance_id: e for e in endpoints}
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        start = time.monotonic() + 0.2  # let every task reach its sleep before the first arrival
        tasks = []
        for index, request in enumerate(requests):
            if assignment is not None:
                endpoint = by_id[assignment[request.request_id]]
            else:
                endpoint = endpoints[index % len(endpoints)]
            tasks.append(_one_request(client, endpoint, request, start))
        return list(await asyncio.gather(*tasks))


def capped_workload(requests: Iterable[TraceRequest], max_input_tokens: int, max_output_tokens: int) -> list[TraceRequest]:
    """A trace with lengths capped, so a live replay on the real clock stays short."""
    capped = []
    for request in requests:
        request.input_tokens = min(request.input_tokens, max_input_tokens)
        request.output_tokens = max(2, min(request.output_tokens, max_output_tokens))
        capped.append(request)
    return capped


def engine_specs(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """One EmulatedEngineConfig (as kwargs) per simulated instance, with the same ids."""
    return [
        {"gpu": pool.gpu.name, "model": pool.model.name, "tp": pool.tp, "instance_id": instance_id,
         "engine": pool.engine}
        for pool in cluster.pools
        for instance_id in pool.instance_ids()
    ]


def _serve_engines(specs: list[dict[str, Any]], ports: Any, stop: Any) -> None:
    """Child process: serve emulated engines until `stop` is set; report their URLs."""
    from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
    from sim.engine_http import EngineServer

    async def main() -> None:
        servers = [EngineServer(EmulatedEngine(EmulatedEngineConfig(**spec))) for spec in specs]
        for server in servers:
            await server.start()
        ports.put([(s.engine.instance_id, s.base_url, s.engine.served_model_names[0]) for s in servers])
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for server in servers:
            await server.stop()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


@contextlib.contextmanager
def engines_in_subprocess(specs: list[dict[str, Any]], timeout_s: float = 60.0) -> Iterator[list[Endpoint]]:
    """Serve emulated engines (kwargs of EmulatedEngineConfig each) in a child process.

    The live replay's client must not share an event loop (or a GIL) with the engines it
    measures: their iterations would be delayed by the client's own work.
    """
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    stop = ctx.Event()
    process = ctx.Process(target=_serve_engines, args=(specs, ports, stop), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                started = ports.get(timeout=0.2)
                break
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(
                        f"the emulated engines' process exited with code {process.exitcode} before serving"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"emulated engines did not start within {timeout_s:.0f} s") from None
        yield [Endpoint(*entry) for entry in started]
    finally:
        stop.set()
        process.join(timeout=15)
        if process.is_alive():
            process.kill()
            process.join()


@dataclass(frozen=True, slots=True)
class Agreement:
    metric: str  # "ttft" or "tpot"
    percentile: int
    live_ms: float
    sim_ms: float

    @property
    def relative_error(self) -> float:
        return abs(self.sim_ms - self.live_ms) / self.live_ms if self.live_ms > 0 else float("inf")


def compare(
    live: Sequence[RequestRecord],
    simulated: Sequence[RequestRecord],
    percentiles: Sequence[int] = (50, 90, 99),
) -> list[Agreement]:
    """TTFT and TPOT percentiles of both runs, side by side."""
    rows: list[Agreement] = []
    for metric in ("ttft", "tpot"):
        live_values = np.array([getattr(r, f"{metric}_s") for r in live if getattr(r, f"{metric}_s") is not None])
        sim_values = np.array(
            [getattr(r, f"{metric}_s") for r in simulated if getattr(r, f"{metric}_s") is not None]
        )
        if metric == "tpot":
            # One-token outputs have no time per output token.
            live_values = live_values[live_values > 0]
            sim_values = sim_values[sim_values > 0]
        if len(live_values) == 0 or len(sim_values) == 0:
            raise ValueError(f"no {metric} values to compare (live {len(live_values)}, sim {len(sim_values)})")
        for p in percentiles:
            rows.append(
                Agreement(
                    metric,
                    p,
                    float(np.percentile(live_values, p)) * 1000.0,
                    float(np.percentile(sim_values, p)) * 1000.0,
                )
            )
    return rows


def format_agreement(rows: Sequence[Agreement]) -> str:
    lines = [f"{'metric':8s} {'pct':>4s} {'live ms':>10s} {'sim ms':>10s} {'error':>8s}"]
    for row in rows:
        lines.append(
            f"{row.metric:8s} {'p' + str(row.percentile):>4s} {row.live_ms:10.2f} {row.sim_ms:10.2f} "
            f"{row.relative_error * 100:7.1f}%"
        )
    return "\n".join(lines)
