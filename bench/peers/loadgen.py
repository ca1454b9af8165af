"""Closed-loop HTTP load generator for bench/router_overhead.py, run as its own process.

`concurrency` workers, each on its own kept-alive connection, send the same POST back to
back for `duration_s` (after `warmup_s` that is not recorded) and record each request's
latency (to the last byte) and, for streams, its time to the first body chunk. Prints
one JSON object: requests/s, latency percentiles in µs, errors.

It uses router.proxy.UpstreamPool as its client: the same client for the direct baseline
and for every router measured, so only what sits between client and engine differs.

    python bench/peers/loadgen.py --url http://127.0.0.1:8000 --path /v1/completions \
        --concurrency 32 --duration-s 3 --body '{"model": "m", "prompt": "hi"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from router.proxy import UpstreamError, UpstreamPool  # noqa: E402


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


async def run(args: argparse.Namespace) -> dict[str, object]:
    pool = UpstreamPool(args.url, connect_timeout_s=5.0, max_idle=args.concurrency + 8)
    body = args.body.encode()
    headers = b"Content-Type: application/json\r\n"
    if args.api_key:
        headers += f"Authorization: Bearer {args.api_key}\r\n".encode()
    latencies: list[float] = []
    first_chunks: list[float] = []
    errors: dict[str, int] = {}
    recording = False
    stop = False

    async def worker() -> None:
        while not stop:
            start = time.perf_counter()
            try:
                response = await pool.request("POST", args.path, body, headers, headers_timeout_s=30.0)
                first = await response.next_chunk(30.0)
                first_s = time.perf_counter()
                while await response.next_chunk(30.0) is not None:
                    pass
                status = response.status
            except UpstreamError as exc:
                errors[exc.kind] = errors.get(exc.kind, 0) + 1
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            if status != 200 or first is None:
                errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1
                continue
            if recording:
                latencies.append(end - start)
                first_chunks.append(first_s - start)

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup_s)
    recording = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration_s)
    recording = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    pool.close()
    latencies.sort()
    first_chunks.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "first_chunk_p50_us": percentile(first_chunks, 0.50) * 1e6,
        "first_chunk_p99_us": percentile(first_chunks, 0.99) * 1e6,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/v1/completions")
    parser.add_argument("--body", required=True)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
