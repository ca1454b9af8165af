"""What the live control loop costs: the router's workload hook, and one control round.

1. The hook on the request path (router/workload_recorder.py): an answered request's
   `send` calls go through a `UsageMeter` and end with `finished()`; measured against the
   same `send` calls made directly, in the same run (ratio and ns per request), for a
   non-streamed answer (start + one body) and a 64-chunk stream.
2. The stored document: bytes of one replica's full histogram (30 slots x 3 classes x
   the 6 x 4 default buckets), which bounds what each replica writes every 5 s.
3. One control round (`ControlPlane.tick`, print actuator, embedded store) merging
   `--replicas` router histograms for 7 pools, with the re-solve and without, against
   the solve alone; per `route_by` (cell, and predicted with a given noise or with a
   tau, which is calibrated on the grid at every re-solve).

    python bench/controlplane.py               # ~20 s
    python bench/controlplane.py --rounds-only # the control rounds only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def _sink(message: dict[str, Any]) -> None:
    return None


def _messages(chunks: int) -> list[dict[str, Any]]:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    if chunks == 0:
        body = b'{"id": "x", "choices": [{"text": "' + b"y" * 400 + b'"}], "usage": {"prompt_tokens": 812, ' \
            b'"completion_tokens": 64, "total_tokens": 876}}'
        return [start, {"type": "http.response.body", "body": body}]
    chunk = b'data: {"id": "x", "choices": [{"index": 0, "text": "tok"}]}\n\n'
    return [start, *({"type": "http.response.body", "body": chunk, "more_body": True} for _ in range(chunks)),
            {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True}]


async def hook_cost(requests: int, chunks: int) -> tuple[float, float]:
    """(ns per request direct, ns per request through the hook)."""
    from router.state import FileStateStore
    from router.workload_recorder import WorkloadRecorder

    with tempfile.TemporaryDirectory() as tmp:
        store = FileStateStore(Path(tmp) / "s.db")
        recorder = WorkloadRecorder(store, "bench")
        messages = _messages(chunks)
        t0 = time.perf_counter()
        for _ in range(requests):
            for m in messages:
                await _sink(m)
        direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(requests):
            meter = recorder.meter(_sink)
            for m in messages:
                await meter(m)
            recorder.finished("llama-3-8b", "default", 800, meter)
        hooked = time.perf_counter() - t0
        assert recorder.recorded == requests
        await store.close()
    return direct / requests * 1e9, hooked / requests * 1e9


def document_bytes() -> int:
    from router.workload_recorder import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES
    from scheduler.planner.histogram import LengthHistogram

    hist = LengthHistogram(DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, 60.0, 30)
    for slot in range(30):
        for klass in ("interactive", "default", "batch"):
            for i in range(len(DEFAULT_INPUT_EDGES) - 1):
                for j in range(len(DEFAULT_OUTPUT_EDGES) - 1):
                    hist.counts[(28_000_000 + slot, klass, i, j)] = 1234
    return len(json.dumps({"replica": "router-abcdef12", "models": {"llama-3-8b": hist.as_dict()}}))


ROUTE_BY: dict[str, dict[str, Any]] = {
    "cell": {},
    "predicted, rank_noise_sd 0.8": {"route_by": "predicted", "rank_noise_sd": 0.8},
    "predicted, rank_tau 0.45": {"route_by": "predicted", "rank_tau": 0.45},
}


async def round_cost(replicas: int, rounds: int, route_by: dict[str, Any] | None = None
                     ) -> tuple[float, float, float, float]:
    """(ms per round with a re-solve, ms per round without, ms per solve alone, the plan's $/h)."""
    from router.controlplane import ControlPlane, PrintActuator, parse_config
    from router.state import FileStateStore
    from router.workload_recorder import WorkloadRecorder

    gpus = [("a10g", 1.01, 1.0), ("l4", 0.8, 0.8), ("a100", 3.67, 4.0), ("h100", 6.9, 7.0),
            ("l40s", 1.9, 2.2), ("a100-tp2", 7.34, 7.0), ("h100-tp2", 13.8, 12.0)]
    pools = [{"name": n, "gpu": n, "usd_per_hour": usd,
              "capacity_rps": [[speed * 8 / (1 + i + j) for j in range(3)] for i in range(5)]} for n, usd, speed in gpus]
    doc = {"store": "file:///unused", "pools": pools, "actuator": "print", "input_edges": [0, 256, 1024, 2048, 4096, 8192],
           "output_edges": [0, 64, 256, 1024], "autoscaler": {"interval_s": 60, "window_s": 600},
           **(route_by or {})}
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStateStore(Path(tmp) / "s.db")
        now = time.time()
        for r in range(replicas):
            rec = WorkloadRecorder(store, f"router-{r}", clock=lambda: now - 300)
            for k in range(2000):
                rec.record("llama-3-8b", "default", (k * 37) % 9000, (k * 11) % 1100)
            await rec.flush()
        config = parse_config(doc, "bench.yaml")
        plane = ControlPlane(config, store, PrintActuator({}, emit=lambda _: None))
        with_solve, without, solves = [], [], []
        for _ in range(rounds):
            plane.last_solve_s = float("-inf")
            t0 = time.perf_counter()
            await plane.tick()
            with_solve.append(time.perf_counter() - t0)
            assert plane.plan is not None
            solves.append(plane.plan.solve_s)
            t0 = time.perf_counter()
            await plane.tick()
            without.append(time.perf_counter() - t0)
        solve_s = min(solves)
        usd_per_hour = plane.plan.usd_per_hour if plane.plan is not None else float("nan")
        plane.close()
        await store.close()
    return min(with_solve) * 1e3, min(without) * 1e3, solve_s * 1e3, usd_per_hour


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rounds-only", action="store_true", help="only the control rounds, per route_by")
    args = parser.parse_args(argv)
    if args.rounds_only:
        _print_rounds(args.replicas, args.rounds)
        return 0
    print("| case | direct ns/req | through the hook ns/req | ratio |")
    print("| --- | --- | --- | --- |")
    for name, chunks in (("non-streamed (usage in the body)", 0), ("stream of 64 chunks", 64)):
        direct, hooked = asyncio.run(hook_cost(args.requests, chunks))
        print(f"| {name} | {direct:.0f} | {hooked:.0f} | {hooked / direct:.2f}x |")
    print(f"\nfull stored histogram of one replica: {document_bytes()} bytes")
    _print_rounds(args.replicas, args.rounds)
    return 0


def _print_rounds(replicas: int, rounds: int) -> None:
    print(f"\ncontrol round, {replicas} router histograms, 7 pools, 5x3 buckets (best of {rounds}):")
    print("| route_by | round with re-solve ms | of it the solve ms | round without ms | plan $/h |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, extra in ROUTE_BY.items():
        with_solve, without, solve, usd = asyncio.run(round_cost(replicas, rounds, extra))
        print(f"| {name} | {with_solve:.1f} | {solve:.1f} | {without:.1f} | {usd:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
