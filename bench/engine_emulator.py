"""How many concurrent streams one emulated engine sustains on one core, and the lag it adds.

Starts `tokenyard engine` in a subprocess pinned to CPU 0, and drives it from this process
(pinned to CPU 1 when there is one) with N closed-loop streaming clients: each sends a
`/v1/completions` stream (`ignore_eos`, fixed max_tokens), reads it to the end, and sends
the next, until the level's time is up. The client is a minimal HTTP/1.1 reader on uvloop,
so that the load generator is not the bottleneck.

For each concurrency level it reports:
- measured TPOT: client-side, token-weighted (sum over requests of last-first token time,
  divided by the sum of tokens-1);
- modelled TPOT: the engine's own sum of modelled iteration durations between a request's
  consecutive tokens (`GET /tokenyard/stats`, the durations the core reported), same weighting;
- their ratio (1.00 = the emulator keeps the model's pace exactly);
- event-loop lag: how late the engine loop woke up after each iteration's modelled end
  (p50, p99), and the engine process's CPU use (1.0 = one core saturated).

    python bench/engine_emulator.py [--levels 1 64 256] [--seconds 10] [--time-scale 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LevelResult:
    concurrency: int
    requests: int = 0
    tokens: int = 0
    decode_s_sum: float = 0.0  # sum over requests of (last - first token time)
    decode_gaps: int = 0  # sum over requests of (tokens - 1)
    ttft_s: list[float] = field(default_factory=list)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_json(host: str, port: int, method: str, path: str) -> dict:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


async def stream_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                      result: LevelResult) -> None:
    clock = time.perf_counter
    sent = clock()
    writer.write(request)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"engine answered {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers; the body is chunked
    first = last = 0.0
    tokens = 0
    buffer = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            break
        data = await reader.readexactly(size + 2)
        now = clock()
        buffer += data[:-2]
        events, _, buffer = buffer.rpartition(b"\n\n")
        for event in events.split(b"\n\n"):
            if event.startswith(b'data: {') and b'"text":' in event:
                tokens += 1
                if tokens == 1:
                    first = now
                last = now
    result.requests += 1
    result.tokens += tokens
    if tokens > 1:
        result.decode_s_sum += last - first
        result.decode_gaps += tokens - 1
    result.ttft_s.append(first - sent)


async def client(host: str, port: int, deadline: float, max_tokens: int, result: LevelResult, index: int) -> None:
    await asyncio.sleep(random.Random(index).uniform(0, 0.5))  # stagger the first wave
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    number = 0
    try:
        while time.perf_counter() < deadline:
            body = json.dumps({
                "model": "llama-3-8b", "prompt": f"client {index} request {number}: " + "tell me more " * 10,
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            }).encode()
            request = (
                f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode() + body
            try:
                await stream_once(reader, writer, request, result)
            except (RuntimeError, ValueError, OSError, asyncio.IncompleteReadError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            number += 1
    finally:
        writer.close()


async def run_level(host: str, port: int, pid: int, concurrency: int, seconds: float, max_tokens: int) -> dict:
    await http_json(host, port, "POST", "/tokenyard/stats/reset")
    result = LevelResult(concurrency)
    cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(host, port, deadline, max_tokens, result, i) for i in range(concurrency)))
    wall = time.perf_counter() - wall_before  # clients finish the request they are in after the deadline
    cpu_used = cpu_seconds(pid) - cpu_before
    cpu = cpu_used / wall
    stats = await http_json(host, port, "GET", "/tokenyard/stats")
    measured = result.decode_s_sum / result.decode_gaps if result.decode_gaps else float("nan")
    modelled = stats["modelled_itl_mean_s"]
    ttft = sorted(result.ttft_s)
    return {
        "concurrency": concurrency,
        "requests": result.requests,
        "tokens": result.tokens,
        "errors": result.errors,
        "tokens_per_s": result.tokens / wall,
        "measured_tpot_ms": measured * 1e3,
        "modelled_tpot_ms": modelled * 1e3,
        "tpot_ratio": measured / modelled if modelled else float("nan"),
        "ttft_p50_ms": ttft[len(ttft) // 2] * 1e3 if ttft else float("nan"),
        "loop_lag_p50_ms": stats["loop_lag_p50_s"] * 1e3,
        "loop_lag_p99_ms": stats["loop_lag_p99_s"] * 1e3,
        "engine_cpu_cores": cpu,
        "engine_cpu_us_per_token": cpu_used * 1e6 / max(1, result.tokens),
        "box_load_avg_1m": os.getloadavg()[0],  # other jobs on the machine; high = noisy row
    }


async def zero_latency_client(host: str, port: int, deadline: float, latencies: list[float], index: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = json.dumps({"model": "llama-3-8b", "prompt": f"client {index}: hello", "max_tokens": 16,
                       "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    clock = time.perf_counter
    try:
        while clock() < deadline:
            sent = clock()
            writer.write(request)
            length = 0
            status = await reader.readline()
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"engine answered {status!r}")
            latencies.append(clock() - sent)
    finally:
        writer.close()


async def run_zero_latency(host: str, port: int, pid: int, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    client_before = time.process_time()
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(zero_latency_client(host, port, deadline, latencies, i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests_per_s": len(latencies) / wall,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "latency_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "engine_cpu_cores": (cpu_seconds(pid) - cpu_before) / wall,
        "engine_cpu_ms_per_request": (cpu_seconds(pid) - cpu_before) * 1e3 / max(1, len(latencies)),
        "client_cpu_cores": (time.process_time() - client_before) / wall,
        "box_load_avg_1m": os.getloadavg()[0],
    }


def start_engine(port: int, time_scale: float, max_num_seqs: int, gpu: str) -> subprocess.Popen[bytes]:
    def pin() -> None:
        os.sched_setaffinity(0, {0})

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--log-level", "warning", "engine", "--gpu", gpu,
         "--model", "llama-3-8b", "--port", str(port), "--time-scale", str(time_scale),
         "--max-num-seqs", str(max_num_seqs)],
        env=env, preexec_fn=pin if hasattr(os, "sched_setaffinity") else None,
    )


async def wait_healthy(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if process.poll() is not None:
            raise SystemExit(f"engine exited with {process.returncode}")
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit("engine did not come up in 20 s")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['concurrency']}\nx{r['time_scale']:g}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    left.bar(labels, [r["tpot_ratio"] for r in rows], color="#4477aa")
    left.axhline(1.0, color="black", lw=0.8)
    left.set_title("measured / modelled TPOT")
    left.set_xlabel("concurrent streams, time scale")
    right.set_xlabel("concurrent streams, time scale")
    right.bar(labels, [r["loop_lag_p99_ms"] for r in rows], color="#cc6677", label="p99")
    right.bar(labels, [r["loop_lag_p50_ms"] for r in rows], color="#ee9988", label="p50")
    right.set_title("engine event-loop lag (ms)")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-scale", type=float, nargs="+", default=[1.0],
                        help="run every level at each of these time scales (smaller = more tokens/s)")
    parser.add_argument("--gpu", default="A100-80GB")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "img" / "engine_emulator.png")
    parser.add_argument("--zero-latency", action="store_true",
                        help="instead: non-streaming requests/s of an engine at time scale 0 (16 tokens each), "
                             "the engine a router benchmark compares against")
    args = parser.parse_args()
    if args.zero_latency:
        await zero_latency_main(args)
        return

    from tqdm import tqdm

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})
    host = "127.0.0.1"
    rows: list[dict] = []
    progress = tqdm(total=len(args.levels) * len(args.time_scale), desc="levels", unit="level")
    for time_scale in args.time_scale:
        port = free_port()
        process = start_engine(port, time_scale, max(args.levels), args.gpu)
        try:
            await wait_healthy(host, port, process)
            for level in args.levels:
                row = await run_level(host, port, process.pid, level, args.seconds, args.max_tokens)
                row["time_scale"] = time_scale
                rows.append(row)
                progress.update()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    progress.close()

    header = ("streams", "scale", "tok/s", "measured TPOT ms", "modelled TPOT ms", "ratio",
              "loop lag p50 ms", "p99 ms", "engine CPU", "engine CPU us/token", "box load", "errors")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['concurrency']} | {r['time_scale']:g} | {r['tokens_per_s']:.0f} | {r['measured_tpot_ms']:.2f} | "
              f"{r['modelled_tpot_ms']:.2f} | {r['tpot_ratio']:.3f} | {r['loop_lag_p50_ms']:.2f} | "
              f"{r['loop_lag_p99_ms']:.2f} | {r['engine_cpu_cores']:.2f} | {r['engine_cpu_us_per_token']:.1f} | "
              f"{r['box_load_avg_1m']:.1f} | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


async def zero_latency_main(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})
    host, port = "127.0.0.1", free_port()
    process = start_engine(port, 0.0, max(args.levels), args.gpu)
    rows = []
    try:
        await wait_healthy(host, port, process)
        for level in args.levels:
            rows.append(await run_zero_latency(host, port, process.pid, level, args.seconds))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    print("| concurrency | requests/s | latency p50 ms | latency p99 ms | engine CPU (cores) | engine CPU ms/request "
          "| requests per engine CPU-second | load generator CPU | box load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.0f} | {r['latency_p50_ms']:.2f} | "
              f"{r['latency_p99_ms']:.2f} | {r['engine_cpu_cores']:.2f} | {r['engine_cpu_ms_per_request']:.3f} | "
              f"{1e3 / r['engine_cpu_ms_per_request']:.0f} | {r['client_cpu_cores']:.2f} | {r['box_load_avg_1m']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
