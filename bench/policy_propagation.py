"""How fast a policy change is live in every router replica, and what a rate-limit check
costs, per state store backend, measured in one run.

- Propagation: two `Router` replicas (each its own store connection) follow the store;
  a third connection commits a new policy version (`PolicyVersions.commit`); the time
  until both replicas apply it (tenant's priority changed), per trial. Target (issue
  #15): within 1 s. The file store's watcher polls every 0.2 s; Redis uses pub/sub.
- Rate-limit check: `check()` of the in-memory bucket (the baseline) against the Redis
  bucket (one Lua script call), median per call and the ratio.

    nice -n 10 python bench/policy_propagation.py              # ~20 s, Redis at 127.0.0.1:6379
    nice -n 10 python bench/policy_propagation.py --trials 50

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from router.app import Router  # noqa: E402
from router.config import parse_router_config  # noqa: E402
from router.policy_versions import PolicyVersions  # noqa: E402
from router.rate_limiter import LocalRateLimiter, RedisRateLimiter  # noqa: E402
from router.state import RedisStateStore, open_store  # noqa: E402
from scheduler.rate_limit import RateLimit  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def propagation(url: str, trials: int, label: str) -> list[float]:
    config = parse_router_config({"tenants": {"acme": {"api_keys": ["sk-acme"]}}}, "bench.yaml")
    replicas = [Router(config, store=open_store(url)), Router(config, store=open_store(url))]
    for router in replicas:
        await router.start()
    writer = open_store(url)
    versions = PolicyVersions(writer)
    took_s = []
    try:
        await asyncio.sleep(0.3)
        for trial in tqdm(range(trials), desc=f"propagation {label}", unit="change", leave=False):
            start = time.monotonic()
            await versions.commit("acme", {"priority": trial + 1}, expected_version=None, author="bench",
                                  reason=f"trial {trial}")
            while not all(r.tenants.tenants["acme"].priority == trial + 1 for r in replicas):
                if time.monotonic() - start > 10:
                    raise RuntimeError(f"{label}: a replica did not apply version {trial + 1} within 10 s")
                await asyncio.sleep(0.002)
            took_s.append(time.monotonic() - start)
            await asyncio.sleep(0.05)
    finally:
        for router in replicas:
            await router.stop()
        if isinstance(writer, RedisStateStore):
            await writer.delete_all()
        await writer.close()
    return took_s


async def check_cost(limiter: object, calls: int) -> list[float]:
    limits = {"requests": RateLimit.per_minute(10**9), "tokens": RateLimit.per_minute(10**12)}
    costs = {"requests": 1.0, "tokens": 300.0}
    out = []
    for i in range(calls):
        start = time.perf_counter()
        await limiter.check(f"t{i % 50}", limits, costs)  # type: ignore[attr-defined]
        out.append(time.perf_counter() - start)
    return out


async def main(args: argparse.Namespace) -> None:
    redis_url = f"{args.redis}?prefix=tybench-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"file (SQLite, polled 0.2 s)": await propagation(f"file://{tmp}/state.db", args.trials, "file"),
                "Redis (pub/sub)": await propagation(redis_url, args.trials, "redis")}
    print(f"\nPolicy change live in both of 2 replicas ({args.trials} changes each):\n")
    print("| store | median ms | p95 ms | max ms | within 1 s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in rows.items():
        inside = sum(v < 1.0 for v in values)
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {1000 * pct(values, 0.95):.1f} | "
              f"{1000 * max(values):.1f} | {inside}/{len(values)} |")
    store = RedisStateStore(args.redis, prefix=f"tybench-{uuid.uuid4().hex[:8]}:")
    try:
        local = await check_cost(LocalRateLimiter(), args.calls)
        shared = await check_cost(RedisRateLimiter(store), args.calls)
    finally:
        await store.delete_all()
        await store.close()
    base = statistics.median(local)
    print(f"\nRate-limit check ({args.calls} calls, 2 buckets):\n")
    print("| buckets | median us | p99 us | ratio to in-memory |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in (("in memory (baseline)", local), ("Redis, one Lua call", shared)):
        print(f"| {name} | {1e6 * statistics.median(values):.1f} | {1e6 * pct(values, 0.99):.1f} | "
              f"{statistics.median(values) / base:.0f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    asyncio.run(main(parser.parse_args()))
