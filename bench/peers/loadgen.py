"""Closed-loop HTTP load generator for bench/router_overhead.py, run as its own process.

`concurrency` workers, each on its own kept-alive connection, send the same POST back to
back for `duration_s` (after `warmup_s` that is not recorded) and record each request's
latency (to the last byte) and, for streams, its time to the first body chunk. Prints
one JSON object: requests/s, latency percentiles in µs, errors, and with `--cpu-pid` the
CPU seconds (utime + stime from /proc/<pid>/stat, that process and its live children:
the workers of `--workers N`) the given process spent over the measured window only.

It uses router.proxy.UpstreamPool as its client: the same client for the direct baseline
and for every router measured, so only what sits between client and engine differs.

    python bench/peers/loadgen.py --url http://127.0.0.1:8000 --path /v1/completions \
        --concurrency 32 --duration-s 3 --body '{"model": "m", "prompt": "hi"}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from router.proxy import UpstreamError, UpstreamPool  # noqa: E402


def process_cpu_s(pid: int) -> float:
    """utime + stime of `pid` and its child processes, in seconds (0.0 when it is gone)."""
    tick_hz = os.sysconf("SC_CLK_TCK")
    total_ticks = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Field 2 (comm) may hold spaces; the fields after its closing paren are fixed.
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / tick_hz


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
    completed = 0  # every answer, recorded or not (bench/router_instructions.py counts per answer)

    async def worker() -> None:
        nonlocal completed
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
            completed += 1
            if status != 200 or first is None:
                errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1
                continue
            if recording:
                latencies.append(end - start)
                first_chunks.append(first_s - start)

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup_s)
    cpu_before = process_cpu_s(args.cpu_pid) if args.cpu_pid else 0.0
    recording = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration_s)
    recording = False
    elapsed = time.perf_counter() - started
    cpu_s = process_cpu_s(args.cpu_pid) - cpu_before if args.cpu_pid else float("nan")
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    pool.close()
    latencies.sort()
    first_chunks.sort()
    return {
        "requests": len(latencies),
        "completed": completed,
        "rps": len(latencies) / elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "first_chunk_p50_us": percentile(first_chunks, 0.50) * 1e6,
        "first_chunk_p99_us": percentile(first_chunks, 0.99) * 1e6,
        "errors": errors,
        # Requests still in flight at the window's edges are few (<= concurrency) against thousands.
        "cpu_us_per_request": cpu_s / len(latencies) * 1e6 if latencies and args.cpu_pid else float("nan"),
        "cpu_share": cpu_s / elapsed if args.cpu_pid else float("nan"),
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
    parser.add_argument("--cpu-pid", type=int, default=0, help="report this process's CPU per request")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
