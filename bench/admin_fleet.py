"""Cordon, its filter and ServiceAccount tokens: what each costs, measured in one run.

- Cordon propagation: two router registries over one store (each its own connection);
  replica A cordons (or uncordons) an instance and waits for its write-through, the time
  until replica B's dispatch view has the flag, per trial. Target (issue #15): within 1 s.
- The `not_cordoned` filter: a dispatch decision over 512 instances with the default
  filters before this change (`model, healthy, not_draining`, the baseline) and with
  `not_cordoned` added, as the router runs them (no static-filter cache); median per
  decision and the ratio.
- TokenReview: a control call's token check against the loopback API server with the
  real `kubernetes` client, a cache miss (one TokenReview) against a cache hit.

    nice -n 10 python bench/admin_fleet.py              # ~20 s, Redis at 127.0.0.1:6379
    nice -n 10 python bench/admin_fleet.py --trials 50

Prints Markdown tables.
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

from router.k8s_loopback import LoopbackKubeAPI  # noqa: E402
from router.registry import InstanceRegistry  # noqa: E402
from router.state import InstanceRecord, RedisStateStore, cordon_note, open_store  # noqa: E402
from router.token_review import RoleRule, TokenReviewer, TokenReviewSettings  # noqa: E402
from scheduler.dispatch import ClusterView, build_policy  # noqa: E402
from scheduler.types import InstanceState, RequestInfo  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def propagation(url: str, trials: int) -> list[float]:
    a_store, b_store = open_store(url), open_store(url)
    a, b = InstanceRegistry(a_store), InstanceRegistry(b_store)
    await a.start()
    await b.start()
    a.upsert(InstanceRecord("e0", "http://127.0.0.1:9", "m"))
    await a.flush()
    while "e0" not in b:
        await asyncio.sleep(0.01)
    out = []
    try:
        for k in range(trials):
            want = k % 2 == 0
            started = time.perf_counter()
            a.set_cordon("e0", cordon_note("bench", "trial") if want else None)
            await a.flush()
            while b.get("e0")[1].cordoned != want:
                await asyncio.sleep(0.002)
            out.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
    finally:
        await a.close()
        await b.close()
        if isinstance(a_store, RedisStateStore):
            await a_store.delete_all()
        await a_store.close()
        await b_store.close()
    return out


def decision_us(filters: list[str], n_instances: int, decisions: int) -> list[float]:
    policy = build_policy({"filters": filters, "scorers": ["least_outstanding"]})
    states = [InstanceState(f"i{k}", "m", running=k % 7, cordoned=k % 50 == 0) for k in range(n_instances)]
    view = ClusterView(states)
    request = RequestInfo("r", "m", 100)
    out = []
    for _ in range(decisions):
        started = time.perf_counter()
        policy.decide(view, request)
        out.append((time.perf_counter() - started) * 1e6)
    return out


async def review_us(samples: int) -> tuple[list[float], list[float]]:
    from kubernetes import client

    with LoopbackKubeAPI() as api:
        settings = TokenReviewSettings(roles=(RoleRule(frozenset({"viewer"}), service_account="ops/*"),),
                                       cache_max_entries=samples + 1)
        reviewer = TokenReviewer(settings, client.ApiClient(client.Configuration(host=api.host)))
        misses, hits = [], []
        for k in range(samples):
            token = f"bench-token-{k}-{uuid.uuid4().hex}"
            api.add_token(token, f"system:serviceaccount:ops:sa{k}")
            started = time.perf_counter()
            assert (await reviewer.review(token)).roles
            misses.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            assert (await reviewer.review(token)).roles
            hits.append((time.perf_counter() - started) * 1e6)
    return misses, hits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print("| store | median ms | p95 ms | max ms | within 1 s |\n| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, url in (("file (SQLite, polled 0.2 s)", f"file://{tmp}/s.db"),
                           ("Redis (pub/sub)", f"{args.redis}?prefix=tybench:{uuid.uuid4().hex[:8]}:")):
            ms = asyncio.run(propagation(url, args.trials))
            print(f"| {label} | {statistics.median(ms):.1f} | {pct(ms, 0.95):.1f} | {max(ms):.1f} | "
                  f"{sum(1 for m in ms if m < 1000)}/{len(ms)} |")
    base_filters = ["model", "healthy", "not_draining"]
    decision_us(base_filters, 512, 200)  # warm up
    base = decision_us(base_filters, 512, 3000)
    with_cordon = decision_us([*base_filters, "not_cordoned"], 512, 3000)
    print("\n| filters (512 instances) | median us | p99 us | ratio |\n| --- | ---: | ---: | ---: |")
    for label, values in (("model, healthy, not_draining (baseline)", base),
                          ("+ not_cordoned", with_cordon)):
        print(f"| {label} | {statistics.median(values):.1f} | {pct(values, 0.99):.1f} | "
              f"{statistics.median(values) / statistics.median(base):.2f}x |")
    misses, hits = asyncio.run(review_us(max(20, args.trials)))
    print("\n| token check | median us | p99 us | ratio to cached |\n| --- | ---: | ---: | ---: |")
    for label, values in (("cached answer (baseline)", hits), ("TokenReview (cache miss)", misses)):
        print(f"| {label} | {statistics.median(values):.1f} | {pct(values, 0.99):.1f} | "
              f"{statistics.median(values) / statistics.median(hits):.0f}x |")


if __name__ == "__main__":
    main()
