"""Which HTTP client for the router's hot path: httpx vs aiohttp vs router.proxy.UpstreamPool.

One process (uvloop), N concurrent workers each sending the same non-streaming POST back
to back to a zero-latency fake engine (its own process) for a fixed time per client, the
clients measured one after the other in the same run. Prints requests/s and p50 latency.

    python bench/peers/client_compare.py --concurrency 32 --duration-s 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from router.proxy import UpstreamPool  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BODY = {"model": "llama-3-8b", "prompt": "hello", "max_tokens": 16}


async def measure(name: str, call: Callable[[], Awaitable[bytes]], concurrency: int, duration_s: float) -> dict:
    latencies: list[float] = []
    stop = False

    async def worker() -> None:
        while not stop:
            start = time.perf_counter()
            body = await call()
            assert body.startswith(b"{")
            latencies.append(time.perf_counter() - start)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.3)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.sleep(duration_s)
    count = len(latencies)
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return {"client": name, "rps": count / elapsed, "p50_us": statistics.median(latencies) * 1e6}


async def run(args: argparse.Namespace, url: str) -> list[dict]:
    import aiohttp
    import httpx

    payload = json.dumps(BODY).encode()
    results = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency)) as client:
        async def via_httpx() -> bytes:
            response = await client.post(url + "/v1/completions", content=payload,
                                         headers={"content-type": "application/json"})
            return response.content

        results.append(await measure("httpx", via_httpx, args.concurrency, args.duration_s))
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def via_aiohttp() -> bytes:
            async with session.post(url + "/v1/completions", data=payload,
                                    headers={"content-type": "application/json"}) as response:
                return await response.read()

        results.append(await measure("aiohttp", via_aiohttp, args.concurrency, args.duration_s))
    pool = UpstreamPool(url)

    async def via_pool() -> bytes:
        response = await pool.request("POST", "/v1/completions", payload, b"Content-Type: application/json\r\n")
        return await response.read_all()

    results.append(await measure("router.proxy.UpstreamPool", via_pool, args.concurrency, args.duration_s))
    pool.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=3.0)
    args = parser.parse_args()
    port = free_port()
    engine = subprocess.Popen([sys.executable, str(REPO / "bench" / "peers" / "fake_engine.py"), "--port", str(port)],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        import uvloop

        results = uvloop.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        engine.kill()
    print("| client | req/s | p50 µs |\n| --- | --- | --- |")
    for row in results:
        print(f"| {row['client']} | {row['rps']:.0f} | {row['p50_us']:.0f} |")


if __name__ == "__main__":
    main()
