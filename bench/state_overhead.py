"""Router shared-state benchmark: what the registry and the store cost per request.

Measures, in one run, each against a baseline measured in the same run:

1. the hot-path reads and counters of `InstanceRegistry` with N instances registered
   (`instances()`, `inflight_started`+`inflight_finished`, `update_load`, `find`),
   against rebuilding the instance tuple per call (what a registry without the cached
   snapshot would do);
2. one `claim_affinity` (the only store round trip a request may make) on Redis,
   against a bare Redis PING on the same connection; and on the file store, against a
   read-only `get_affinity` on the same file;
3. how long a membership change made on one replica takes to show in another replica's
   registry over Redis pub/sub and over the file store's polling.

    python bench/state_overhead.py [--instances 1000] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.registry import InstanceRegistry  # noqa: E402
from router.state import InstanceRecord, RedisStateStore, StateStore, open_store  # noqa: E402


def per_call_ns(stmt: object, number: int) -> float:
    timer = timeit.Timer(stmt)  # type: ignore[arg-type]
    return min(timer.repeat(repeat=5, number=number)) / number * 1e9


def bench_registry(n: int) -> list[tuple[str, float, float]]:
    reg = InstanceRegistry()
    for i in range(n):
        reg.upsert(InstanceRecord(f"i{i}", f"http://10.0.{i // 250}.{i % 250}:8000", f"model-{i % 4}"))
    states = dict((s.instance_id, s) for s in reg.instances())
    baseline = per_call_ns(lambda: tuple(states.values()), 2000)
    rows = [("instances() [rebuild tuple per call = baseline]", per_call_ns(reg.instances, 200000), baseline)]

    def inflight() -> None:
        reg.inflight_started("i500")
        reg.inflight_finished("i500")

    def load() -> None:
        reg.update_load("i500", running=3, waiting=1, kv_blocks_used=10, kv_blocks_total=100, now_s=1.0)

    rows.append(("inflight_started + inflight_finished", per_call_ns(inflight, 200000), baseline))
    rows.append(("update_load (all fields)", per_call_ns(load, 200000), baseline))
    rows.append(("find(id)", per_call_ns(lambda: reg.find("i500"), 200000), baseline))
    return rows


async def timed_us(fn: object, count: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        await fn(i)  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def p50_p99(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))]


async def bench_affinity(redis_url: str, count: int) -> list[tuple[str, list[float], list[float]]]:
    rows = []
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStateStore(redis_url, prefix=prefix)
    try:
        await store.ping()
        ping = await timed_us(lambda i: store._redis.ping(), count)
        claim = await timed_us(lambda i: store.claim_affinity(f"s{i % 100}", f"i{i}", 60), count)
        rows.append(("redis claim_affinity [PING = baseline]", claim, ping))
        await store.delete_all()
    except Exception as exc:
        print(f"redis at {redis_url} unavailable, skipped: {exc}")
    finally:
        await store.close()
    with tempfile.TemporaryDirectory() as tmp:
        fstore = open_store(f"file://{tmp}/state.json")
        for i in range(200):  # a realistic document: a fleet and some sessions
            await fstore.put_instance(InstanceRecord(f"i{i}", f"http://10.0.0.{i}:8000", "m"))
        read = await timed_us(lambda i: fstore.get_affinity(f"s{i % 100}"), count)
        claim = await timed_us(lambda i: fstore.claim_affinity(f"s{i % 100}", f"i{i}", 60), count)
        rows.append(("file claim_affinity [get_affinity = baseline]", claim, read))
        await fstore.close()
    return rows


async def propagation_ms(url: str, rounds: int) -> list[float]:
    stores: list[StateStore] = [open_store(url), open_store(url)]
    a, b = (InstanceRegistry(s, resync_s=60.0) for s in stores)
    await a.start()
    await b.start()
    out = []
    try:
        for i in range(rounds):
            iid = f"p{i}"
            t0 = time.perf_counter()
            a.upsert(InstanceRecord(iid, "http://127.0.0.1:1", "m"))
            while iid not in b:
                await asyncio.sleep(0.0005)
            out.append((time.perf_counter() - t0) * 1e3)
    finally:
        await a.close()
        await b.close()
        if isinstance(stores[0], RedisStateStore):
            await stores[0].delete_all()
        for s in stores:
            await s.close()
    return out


async def main_async(args: argparse.Namespace) -> None:
    print(f"== registry hot path, {args.instances} instances (ns per call; ratio to baseline)")
    for name, ns, base in bench_registry(args.instances):
        print(f"{name:55s} {ns:10.0f} ns   baseline {base:10.0f} ns   ratio {ns / base:.4f}")

    print(f"\n== affinity claim, {args.count} calls (us; ratio of p50s)")
    for name, values, base in await bench_affinity(args.redis, args.count):
        p50, p99 = p50_p99(values)
        b50, b99 = p50_p99(base)
        print(f"{name:55s} p50 {p50:8.1f} p99 {p99:8.1f}   baseline p50 {b50:8.1f} p99 {b99:8.1f}   ratio {p50 / b50:.2f}")

    print(f"\n== membership propagation to a second replica, {args.rounds} changes (ms)")
    with tempfile.TemporaryDirectory() as tmp:
        urls = [(f"redis pub/sub ({args.redis})", f"{args.redis}?prefix=bench:{uuid.uuid4().hex[:8]}:"),
                ("file store (0.2 s polling)", f"file://{tmp}/state.json")]
        for name, url in urls:
            try:
                values = await propagation_ms(url, args.rounds)
            except Exception as exc:
                print(f"{name}: skipped ({exc})")
                continue
            p50, p99 = p50_p99(values)
            print(f"{name:55s} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--count", type=int, default=2000, help="affinity claims per store")
    parser.add_argument("--rounds", type=int, default=30, help="membership changes to propagate")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
