"""Soak: the `tokenyard up` fleet under steady open-loop load at a fraction of its measured
capacity, sampling the router's RSS, open fds, asyncio tasks and client connections.

The fleet is the one `tokenyard up` starts (three emulated engine processes, built with
cli.up's own Fleet and router document, control plane included); the router runs
in this process so that its tasks can be counted; the load generator is this file's
`load` mode in its own process (router.proxy.UpstreamPool as the client, Poisson
arrivals). First a closed-loop step at `--probe-concurrency` measures capacity (req/s);
then the soak runs at `--load` x capacity for `--duration-s`: a mix of both models,
streaming and not, some requests with session ids, and one hostile client in 50 (it
disconnects mid-request). Growth = last quarter's mean minus first quarter's mean.

    python bench/soak.py                                   # 60 s soak (short default)
    python bench/soak.py --duration-s 600 --load 0.8       # the full 10-minute soak
Prints a Markdown table; writes a PNG (default docs/img/soak.png) and --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BODIES = [
    {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24},
    {"model": "qwen2.5-1.5b", "prompt": "Once upon a time", "max_tokens": 16, "stream": True},
    {"model": "llama-3-8b", "prompt": "Summarise: " + "words " * 200, "max_tokens": 8},
    {"model": "qwen2.5-1.5b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": True},
]


# -- the load generator (its own process) ---------------------------------------------------
async def generate(url: str, rate: float, duration_s: float, concurrency: int, seed: int) -> dict[str, Any]:
    from router.proxy import UpstreamError, UpstreamPool

    pool = UpstreamPool(url, connect_timeout_s=5.0, max_idle=512)
    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    inflight: set[asyncio.Task[None]] = set()
    hung = 0

    async def one(i: int) -> None:
        nonlocal hung
        body = dict(BODIES[i % len(BODIES)])
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        headers = b"Content-Type: application/json\r\n"
        if i % 3 == 0:
            headers += f"X-Session-Id: soak-{i % 500}\r\n".encode()
        started = time.perf_counter()
        try:
            response = await pool.request("POST", path, json.dumps(body).encode(), headers, headers_timeout_s=60)
            if i % 50 == 7:  # a client that leaves mid-request
                response.abort()
                statuses["client_left"] = statuses.get("client_left", 0) + 1
                return
            while await response.next_chunk(60) is not None:
                pass
            key = str(response.status)
        except UpstreamError as exc:
            key = exc.kind
            hung += exc.kind == "timeout"
        statuses[key] = statuses.get(key, 0) + 1
        latencies.append(time.perf_counter() - started)

    t0 = time.perf_counter()
    next_s = t0
    i = 0
    while next_s < t0 + duration_s:
        now = time.perf_counter()
        if next_s > now:
            await asyncio.sleep(next_s - now)
        if len(inflight) < concurrency:
            task = asyncio.ensure_future(one(i))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        else:
            statuses["shed_by_generator"] = statuses.get("shed_by_generator", 0) + 1
        i += 1
        next_s += rng.expovariate(rate)
    await asyncio.gather(*inflight, return_exceptions=True)
    pool.close()
    latencies.sort()
    elapsed = time.perf_counter() - t0
    return {"sent": i, "rps": len(latencies) / elapsed, "statuses": statuses, "timeouts": hung,
            "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None}


def load_main(args: argparse.Namespace) -> int:
    import uvloop

    print(json.dumps(uvloop.run(generate(args.url, args.rate, args.duration_s, args.concurrency, args.seed))))
    return 0


# -- the fleet and the router (this process) ---------------------------------------------------
def proc_sample(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def sampler(server: Any, samples: list[dict[str, float]], t0: float, every_s: float) -> None:
    while True:
        rss, fds = proc_sample(os.getpid())
        samples.append({"t_s": time.monotonic() - t0, "rss_mb": rss, "fds": fds, "tasks": len(asyncio.all_tasks()),
                        "connections": len(server.connections),
                        "upstream": sum(len(p.connections()) for p in server.router.pools.pools().values())})
        await asyncio.sleep(every_s)


async def run_load(url: str, rate: float, duration_s: float, concurrency: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "load", "--url", url, "--rate", str(rate), "--duration-s",
        str(duration_s), "--concurrency", str(concurrency), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), duration_s + 180)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode()[-800:]}")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def growth(samples: list[dict[str, float]], key: str) -> float:
    quarter = max(1, len(samples) // 4)
    return statistics.mean(s[key] for s in samples[-quarter:]) - statistics.mean(s[key] for s in samples[:quarter])


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from cli.up import DEFAULT_FLEET, Fleet, router_document
    from router.app import Router
    from router.auth import write_token_file
    from router.config import parse_router_config
    from router.http_server import RouterServer
    from router.state import open_store

    state_dir = Path(tempfile.mkdtemp(prefix="tokenyard-soak-"))
    fleet = Fleet(DEFAULT_FLEET, state_dir, args.time_scale)
    server = None
    try:
        await fleet.start(60)
        write_token_file(state_dir / "control-tokens.yaml")
        doc = router_document(fleet.entries, "127.0.0.1", 0, f"file://{state_dir}/state.db",
                              {"host": "127.0.0.1", "port": 0,
                               "tokens_file": str(state_dir / "control-tokens.yaml")},
                              worker_token_file=str(fleet.worker_token_file))
        server = RouterServer(Router(parse_router_config(doc, "soak.yaml"), store=open_store(doc["store"])))
        await server.start()
        url = server.url
        print(f"probing capacity: closed loop-ish at {args.probe_concurrency} in flight for {args.probe_s:.0f} s",
              flush=True)
        probe = await run_load(url, 10_000.0, args.probe_s, args.probe_concurrency)
        capacity = probe["rps"]
        rate = args.load * capacity
        print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {args.duration_s:.0f} s", flush=True)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        sampling = asyncio.ensure_future(sampler(server, samples, t0, args.sample_s))
        loading = asyncio.ensure_future(run_load(url, rate, args.duration_s, args.probe_concurrency * 4))
        with tqdm(total=int(args.duration_s), desc="soak", unit="s") as bar:
            while not loading.done():
                await asyncio.sleep(1.0)
                bar.update(1)
        result = await loading
        under_load = [s for s in samples if s["t_s"] <= args.duration_s]
        await asyncio.sleep(3 * args.sample_s)  # the idle tail: connections and tasks settle
        sampling.cancel()
        return {"capacity_rps": capacity, "rate_rps": rate, "probe": probe, "soak": result, "samples": samples,
                "baseline": samples[0], "after": samples[-1],
                "growth": {k: growth(under_load[1:], k) for k in ("rss_mb", "fds", "tasks", "connections",
                                                                  "upstream")}}
    finally:
        if server is not None:
            await server.stop()
        await fleet.stop()


def plot(samples: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, key in zip(axes, ("rss_mb", "fds", "tasks", "connections"), strict=True):
        ax.plot([s["t_s"] for s in samples], [s[key] for s in samples])
        ax.set_title(key)
        ax.set_xlabel("s")
    fig.suptitle("router under soak (bench/soak.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="soak", choices=["soak", "load"])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--probe-s", type=float, default=10.0)
    parser.add_argument("--probe-concurrency", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--time-scale", type=float, default=1.0, help="engine speed (1: modelled GPU speed)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "soak.png"))
    parser.add_argument("--json", default=None)
    # load mode
    parser.add_argument("--url")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "load":
        return load_main(args)
    import uvloop

    result = uvloop.run(soak(args))
    plot(result["samples"], Path(args.out))
    first, last = result["baseline"], result["after"]
    print("| router | before the load | under load: growth (last quarter - first quarter) | idle after |")
    print("| --- | --- | --- | --- |")
    for key in ("rss_mb", "fds", "tasks", "connections", "upstream"):
        print(f"| {key} | {first[key]:.1f} | {result['growth'][key]:+.1f} | {last[key]:.1f} |")
    soak_result = result["soak"]
    print(f"\ncapacity {result['capacity_rps']:.1f} req/s, soak at {result['rate_rps']:.1f} req/s: sent "
          f"{soak_result['sent']}, statuses {soak_result['statuses']}, p50 {soak_result['p50_ms']:.0f} ms, "
          f"p99 {soak_result['p99_ms']:.0f} ms, timeouts {soak_result['timeouts']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
