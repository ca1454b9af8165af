"""Live migration, measured two ways (docs/benchmarks.md, "Live migration").

    python bench/migration.py live   # emulated engines on loopback: downtime and total
                                     # migration time at context 1k/4k/16k/32k
    python bench/migration.py sim    # the simulator on the Azure conversation trace at
                                     # high load: round-robin vs least-load vs least-load
                                     # with migration (p50/p99 TTFT and TPOT, preemptions),
                                     # and dispatch on virtual usage with and without it
    python bench/migration.py sweep  # round-robin, least-load and virtual-usage dispatch,
                                     # the last two with and without migration, on the
                                     # conv and code traces, 8 and 16 instances, loads
                                     # x1.0-1.5 per instance (20 points, ~10 min)
    python bench/migration.py headroom  # the priority headroom of virtual usage with a
                                     # share of high-priority requests: p99 TTFT per class

live: two emulated engines with their Worker gRPC services on
127.0.0.1; a streamed completion with a prompt of N tokens decodes on the source; after a
few tokens MigrateOut moves it; the client reads the source's stream up to the
`tokenyard.migrated` event and then the destination's stream (router/splice.py does
exactly this). Downtime is what the client sees: the time between the last token it read
from the source and the first from the destination (one decode step of the engine is
part of it: `itl_p50_ms` is the normal gap). The model is qwen2.5-7b (32k context) on
A100-80GB at time scale 1; KV bytes per token on the wire are its 56 KiB divided by
`--kv-scale` (default 8: 7 KiB per token, 224 MiB at 32k tokens), since a Python gRPC
copy on loopback is not a GPU link; the stop-and-copy
moves only the blocks the last stage left, so downtime does not grow with the context
whatever the scale. Each context is run `--repeat` times; medians are reported.

sim: `--instances` L4 instances of llama-3-8b (small KV: memory pressure is what
migration relieves), the first `--requests` requests of the Azure conversation trace
with arrivals sped up `--rate-scale` times. Migration: scheduler.migration's llumnix
policy every `--interval-s` (0.05 s), KV copied over a `--link-gbps` link; its parameters
are `--guard` (preempt_guard_blocks), `--guard-per-decode` (guard_blocks_per_decode),
`--reserve` (destination_reserve_blocks) and `--gap` (min_usage_gap), the defaults of
the policy document.

sweep: the same fleet and policies over `--traces` x `--instances` x `--loads`; a load is
per instance (arrivals x load x instances / 8, `--requests-per-instance` each); prints a
line per point (p50/p99 TTFT and TPOT, preemptions, moves per policy) and, for each
policy with migration, the geometric mean over the points of each baseline's p99 TTFT
over its p99 TTFT (and at how many points it is >= 5x).

headroom: the `sim` fleet and trace with VU dispatch + migration, `--share` of the
requests (seeded) `interactive` (priority 0) and the rest `default` (priority 1), the
engines scheduling by priority. Variants: no high-priority class; interactive requests
high priority (`high_priority_below: 1`) with no headroom; then each `--headrooms` H:
H blocks kept per running interactive request (scheduler/priority_headroom.py) in both
dispatch and migration. A line per variant: p50/p99 TTFT overall and per class,
preemptions, moves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ../shared/data from the project root; from a git worktree (/work/wt/<name>) it is two
# levels up; TOKENYARD_SHARED_DATA names it outright.
SHARED_DATA = Path(os.environ.get("TOKENYARD_SHARED_DATA") or next(
    (p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared" / "data"))
AZURE_CONV = SHARED_DATA / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


# ----------------------------------------------------------------- simulator
def sim_cluster(instances: int, picker: str, scorers: list[str]) -> Any:
    from sim.cluster import parse_cluster

    doc = {
        "default_model": "llama-3-8b",
        "pools": [{"name": "l4", "gpu": "L4", "model": "llama-3-8b", "count": instances,
                   "engine": {"max_num_seqs": 128, "max_num_batched_tokens": 4096}}],
        "dispatch": {"filters": ["model"], "scorers": scorers, "picker": picker},
        "slo_classes": {"default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 0}},
    }
    return parse_cluster(doc, "bench/migration.py")


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def sim_variants(args: argparse.Namespace, with_virtual_usage: bool,
                 with_least_load_migration: bool = True) -> list[tuple[str, str, list[str], Any]]:
    """(label, picker, scorers, migration params or None) of the policies compared."""
    params = {"policy": "llumnix", "preempt_guard_blocks": args.guard, "destination_reserve_blocks": args.reserve,
              "min_usage_gap": args.gap, "guard_blocks_per_decode": args.guard_per_decode}
    variants: list[tuple[str, str, list[str], Any]] = [
        ("round-robin", "round_robin", ["least_outstanding"], None),
        ("least-load", "max_score", [args.scorer], None),
    ]
    if with_least_load_migration:
        variants.append(("least-load + migration", "max_score", [args.scorer], params))
    if with_virtual_usage:
        variants += [("virtual-usage dispatch", "max_score", ["least_virtual_usage"], None),
                     ("virtual-usage dispatch + migration", "max_score", ["least_virtual_usage"], params)]
    return variants


def sim_point(args: argparse.Namespace, trace_path: str, instances: int, rate_scale: float, requests: int,
              variants: list[tuple[str, str, list[str], Any]], progress: bool = True) -> list[dict[str, Any]]:
    """One load point: every variant on the same trace slice; a row per variant."""
    from tqdm import tqdm

    from scheduler.migration import build_migration_policy
    from sim.migration import MigrationSimConfig
    from sim.report import summarize
    from sim.simulator import Simulation
    from sim.traces import read_trace

    rows = []
    for label, picker, scorers, migration in variants:
        cluster = sim_cluster(instances, picker, scorers)
        trace = read_trace(trace_path, rate_scale=rate_scale, limit=requests)
        config = None
        if migration is not None:
            config = MigrationSimConfig(policy=build_migration_policy(migration), link_gbps=args.link_gbps,
                                        interval_s=args.interval_s)
        bar = tqdm(total=requests, desc=label, unit="req", leave=False, disable=not progress)

        def tick(now_s: float, finished: int, total: int, bar: Any = bar) -> None:
            bar.n = finished
            bar.refresh()

        sim = Simulation(cluster, progress=tick, total_requests=requests, migration=config, fast_forward=True)
        started = time.perf_counter()
        result = sim.run(trace)
        bar.close()
        summary = summarize(result, cluster.slo_classes)
        done = [r for r in result.records if r.first_token_s is not None and r.finish_s is not None]
        ttft = sorted(r.first_token_s - r.arrival_s for r in done)  # type: ignore[operator]
        tpot = sorted((r.finish_s - r.first_token_s) / (r.output_tokens - 1)  # type: ignore[operator]
                      for r in done if r.output_tokens > 1)
        row = {
            "policy": label, "completed": summary["completed"],
            "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
            "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p99_ms": _pct(tpot, 0.99),
            "preemptions": sum(i.preemptions for i in result.instances),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        if sim.migration is not None:
            row["migrations"] = sim.migration.stats.summary()
        rows.append(row)
    return rows


def run_sim(args: argparse.Namespace) -> int:
    rows = sim_point(args, args.trace, args.instances, args.rate_scale, args.requests,
                     sim_variants(args, with_virtual_usage=not args.no_virtual_usage))
    for row in rows:
        print(json.dumps(row), flush=True)
    base_rr, base_ll, mig = rows[:3]
    print(f"p99 TTFT: round-robin / migration = {base_rr['ttft_p99_ms'] / mig['ttft_p99_ms']:.2f}x; "
          f"least-load / migration = {base_ll['ttft_p99_ms'] / mig['ttft_p99_ms']:.2f}x")
    print(f"p50 TTFT: round-robin / migration = {base_rr['ttft_p50_ms'] / mig['ttft_p50_ms']:.2f}x")
    return 0


SWEEP_SHORT = {"round-robin": "rr", "least-load": "ll", "least-load + migration": "ll_mig",
               "virtual-usage dispatch": "vu", "virtual-usage dispatch + migration": "vu_mig"}


def run_sweep(args: argparse.Namespace) -> int:
    """Round-robin, least-load (with and without migration) and virtual-usage dispatch
    (with and without migration) over traces x fleet sizes x loads. The load is per
    instance: arrivals are sped up `load x instances / 8` times (x1.0 on 8 instances is the
    trace's own rate), with `requests_per_instance x instances` requests. A line per point
    (p50/p99 TTFT and TPOT, preemptions, moves, per policy), then the geometric means of
    the p99 TTFT ratios over the points: each baseline over each policy with migration."""
    from tqdm import tqdm

    traces = {name: str(_trace(name)) for name in args.traces.split(",")}
    sizes = [int(n) for n in args.instances.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    variants = sim_variants(args, with_virtual_usage=not args.no_virtual_usage,
                            with_least_load_migration=not args.no_least_load_migration)
    points = [(t, n, x) for t in traces for n in sizes for x in loads]
    p99: dict[str, list[float]] = {SWEEP_SHORT[v[0]]: [] for v in variants}
    started = time.perf_counter()
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 (closed below)
    try:
        for name, instances, load in tqdm(points, desc="sweep", unit="point"):
            rows = sim_point(args, traces[name], instances, load * instances / 8,
                             args.requests_per_instance * instances, variants, progress=False)
            line: dict[str, Any] = {"trace": name, "instances": instances, "load": load}
            for row in rows:
                key = SWEEP_SHORT[row["policy"]]
                p99[key].append(row["ttft_p99_ms"])
                line[key] = {"ttft_p50_ms": round(row["ttft_p50_ms"]), "ttft_p99_ms": round(row["ttft_p99_ms"]),
                             "tpot_p50_ms": round(row["tpot_p50_ms"], 1), "tpot_p99_ms": round(row["tpot_p99_ms"], 1),
                             "preemptions": row["preemptions"]}
                if "migrations" in row:
                    line[key]["moves"] = row["migrations"]["committed"]
            tqdm.write(json.dumps(line))
            if out is not None:
                out.write(json.dumps(line) + "\n")
    finally:
        if out is not None:
            out.close()
    print(f"{len(points)} points x {len(variants)} policies in {time.perf_counter() - started:.0f} s")
    for mig in (k for k in ("ll_mig", "vu_mig") if k in p99):
        for base in (k for k in ("rr", "ll", "vu") if k in p99):
            ratios = [b / m for b, m in zip(p99[base], p99[mig], strict=True)]
            better = sum(r > 1.02 for r in ratios)
            worse = sum(r < 1 / 1.02 for r in ratios)
            at5 = sum(r >= 5 for r in ratios)
            print(f"p99 TTFT {base} / {mig}: geometric mean {statistics.geometric_mean(ratios):.2f}x; "
                  f"better {better}, within 2% {len(ratios) - better - worse}, worse {worse}; >= 5x at {at5}")
    return 0


def headroom_row(args: argparse.Namespace, instances: int, load: float, below: int, blocks: int) -> dict[str, Any]:
    """One `headroom` variant (see the module docstring)."""
    import dataclasses
    import random

    from scheduler.migration import build_migration_policy
    from sim.cluster import parse_cluster
    from sim.migration import MigrationSimConfig
    from sim.simulator import Simulation
    from sim.traces import read_trace

    headroom = {"priority_headroom_blocks": blocks, "high_priority_below": below}
    cluster = parse_cluster({
        "default_model": "llama-3-8b",
        "pools": [{"name": "l4", "gpu": "L4", "model": "llama-3-8b", "count": instances,
                   "engine": {"max_num_seqs": 128, "max_num_batched_tokens": 4096}}],
        "dispatch": {"filters": ["model"], "scorers": [{"least_virtual_usage": headroom}], "picker": "max_score"},
        "slo_classes": {"interactive": {"ttft_ms": 1000, "tpot_ms": 200, "priority": 0},
                        "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1}},
        "queue": {"policy": "slo_priority"},
    }, "bench/migration.py headroom")
    requests = args.requests_per_instance * instances
    rng = random.Random(args.seed)
    trace = [dataclasses.replace(t, slo_class="interactive" if rng.random() < args.share else "default")
             for t in read_trace(args.trace, rate_scale=load * instances / 8, limit=requests)]
    policy = build_migration_policy({"policy": "llumnix", "preempt_guard_blocks": args.guard,
                                     "destination_reserve_blocks": args.reserve, "min_usage_gap": args.gap,
                                     "guard_blocks_per_decode": args.guard_per_decode, **headroom})
    config = MigrationSimConfig(policy=policy, link_gbps=args.link_gbps, interval_s=args.interval_s)
    sim = Simulation(cluster, total_requests=requests, migration=config, fast_forward=True)
    result = sim.run(trace)
    slo_class = {t.request_id: t.slo_class for t in trace}
    ttft: dict[str, list[float]] = {"interactive": [], "default": []}
    for record in result.records:
        if record.first_token_s is not None:
            ttft[slo_class[record.request_id]].append(record.first_token_s - record.arrival_s)
    every = sorted(ttft["interactive"] + ttft["default"])
    row: dict[str, Any] = {"instances": instances, "load": load, "high_priority_below": below,
                           "priority_headroom_blocks": blocks, "ttft_p50_ms": round(_pct(every, 0.5)),
                           "ttft_p99_ms": round(_pct(every, 0.99))}
    for name, values in ttft.items():
        values.sort()
        row[f"{name}_ttft_p50_ms"] = round(_pct(values, 0.5))
        row[f"{name}_ttft_p99_ms"] = round(_pct(values, 0.99))
    row["preemptions"] = sum(i.preemptions for i in result.instances)
    row["moves"] = sim.migration.stats.committed if sim.migration is not None else 0
    return row


def run_headroom(args: argparse.Namespace) -> int:
    variants = [(0, 0), (1, 0)] + [(1, int(h)) for h in args.headrooms.split(",") if h]
    for point in args.points.split(","):
        instances, load = point.split(":")
        for below, blocks in variants:
            print(json.dumps(headroom_row(args, int(instances), float(load), below, blocks)), flush=True)
    return 0


def _trace(name: str) -> Path:
    files = {"conv": AZURE_CONV, "code": AZURE_CONV.with_name("AzureLLMInferenceTrace_code.csv")}
    return files[name] if name in files else Path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sim = sub.add_parser("sim", help="simulated fleet: policies with and without migration")
    sim.add_argument("--trace", default=str(AZURE_CONV))
    sim.add_argument("--instances", type=int, default=8)
    sim.add_argument("--requests", type=int, default=3000)
    sim.add_argument("--rate-scale", type=float, default=1.4)
    sim.add_argument("--no-virtual-usage", action="store_true", help="leave out the least_virtual_usage rows")
    sweep = sub.add_parser("sweep", help="least-load vs least-load + migration over traces, sizes and loads")
    sweep.add_argument("--traces", default="conv,code", help="conv, code or trace paths, comma-separated")
    sweep.add_argument("--instances", default="8,16")
    sweep.add_argument("--loads", default="1.0,1.2,1.3,1.4,1.5")
    sweep.add_argument("--requests-per-instance", type=int, default=250)
    sweep.add_argument("--no-virtual-usage", action="store_true", help="leave out the least_virtual_usage policies")
    sweep.add_argument("--no-least-load-migration", action="store_true",
                       help="leave out least-load + migration")
    sweep.add_argument("--json", default="", help="also write the per-point lines to this JSONL file")
    headroom = sub.add_parser("headroom", help="the priority headroom with a share of high-priority requests")
    headroom.add_argument("--trace", default=str(AZURE_CONV))
    headroom.add_argument("--points", default="8:1.3,8:1.4,16:1.4", help="instances:load, comma-separated")
    headroom.add_argument("--requests-per-instance", type=int, default=250)
    headroom.add_argument("--share", type=float, default=0.2, help="share of requests in the interactive class")
    headroom.add_argument("--headrooms", default="4,16,64", help="priority_headroom_blocks values, comma-separated")
    headroom.add_argument("--seed", type=int, default=1, help="seeds which requests are interactive")
    for p in (sim, sweep, headroom):
        p.add_argument("--link-gbps", type=float, default=100.0)
        p.add_argument("--interval-s", type=float, default=0.05)
        p.add_argument("--scorer", default="least_kv", help="the least-load scorer (least_kv or least_outstanding)")
        p.add_argument("--guard", type=int, default=8, help="migration preempt_guard_blocks")
        p.add_argument("--reserve", type=int, default=16, help="migration destination_reserve_blocks")
        p.add_argument("--gap", type=float, default=0.0, help="migration min_usage_gap")
        p.add_argument("--guard-per-decode", type=float, default=1.0, help="migration guard_blocks_per_decode")
    live = sub.add_parser("live", help="emulated engines on loopback: downtime and migration time")
    live.add_argument("--contexts", default="1024,4096,16384,32768")
    live.add_argument("--repeat", type=int, default=5)
    live.add_argument("--kv-scale", type=int, default=8)
    live.add_argument("--plot", default=str(REPO / "docs" / "img" / "migration_downtime.png"))
    args = parser.parse_args(argv)
    if args.what == "sim":
        return run_sim(args)
    if args.what == "headroom":
        return run_headroom(args)
    if args.what == "sweep":
        return run_sweep(args)
    return asyncio.run(run_live(args))


LIVE_MODEL = "qwen2.5-7b"  # 32k context; 56 KiB of KV per token
LIVE_OUTPUT_TOKENS = 600


async def _read_sse(response: Any, sink: list[tuple[float, str, str]]) -> None:
    """Append (arrival time, event name, data) for each SSE event of `response`."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            raw, buffer = buffer.split("\n\n", 1)
            name, data = "message", ""
            for line in raw.splitlines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
            sink.append((time.perf_counter(), name, data))


async def live_once(context_tokens: int, kv_scale: int) -> dict[str, Any]:
    import grpc
    import httpx

    from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
    from sim.engine_core import EngineConfig
    from sim.engine_http import ATTACH_HEADER, EngineServer
    from tokenyard.v1 import worker_pb2, worker_pb2_grpc

    def engine(name: str) -> EmulatedEngine:
        return EmulatedEngine(EmulatedEngineConfig(
            model=LIVE_MODEL, gpu="A100-80GB", instance_id=name, time_scale=1.0,
            kv_wire_bytes_per_token=57344 // kv_scale, engine=EngineConfig()))

    src, dst = EngineServer(engine("src"), "127.0.0.1", 0, grpc_port=0), EngineServer(engine("dst"), "127.0.0.1", 0,
                                                                                          grpc_port=0)
    await src.start()
    await dst.start()
    prompt_tokens = min(context_tokens, 32768 - LIVE_OUTPUT_TOKENS)
    body = {"model": LIVE_MODEL, "prompt": list(range(1, prompt_tokens + 1)), "max_tokens": LIVE_OUTPUT_TOKENS,
            "ignore_eos": True, "stream": True}
    events: list[tuple[float, str, str]] = []
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", src.base_url + "/v1/completions", json=body,
                                     headers={"x-request-id": "bench"}) as response:
                reader = asyncio.ensure_future(_read_sse(response, events))
                while sum(1 for e in events if e[1] == "message") < 8:
                    await asyncio.sleep(0.002)
                started = time.perf_counter()
                async with grpc.aio.insecure_channel(src.grpc_address or "") as channel:
                    call = worker_pb2_grpc.WorkerStub(channel).MigrateOut(worker_pb2.MigrateOutRequest(
                        migration_id="bench", request_id="bench", destination_instance_id="dst",
                        destination_address=dst.grpc_address or "", stage_timeout_ms=60000), timeout=120)
                    progress = [p async for p in call]
                total_s = time.perf_counter() - started
                await reader
            final = progress[-1]
            if final.state != worker_pb2.COMMITTED:
                raise RuntimeError(f"migration did not commit: {final}")
            source_tokens = [e for e in events if e[1] == "message"]
            moved = json.loads(events[-1][2])
            headers = {ATTACH_HEADER.decode(): moved["destination_request_id"]}
            after: list[tuple[float, str, str]] = []
            async with client.stream("POST", dst.base_url + "/v1/completions", json=body, headers=headers) as resp:
                await _read_sse(resp, after)
    finally:
        await src.stop()
        await dst.stop()
    tokens_after = [e for e in after if e[1] == "message" and e[2] != "[DONE]"]
    gaps = [b[0] - a[0] for a, b in zip(source_tokens, source_tokens[1:], strict=False)]
    downtime_s = tokens_after[0][0] - source_tokens[-1][0]
    assert len(source_tokens) + len(tokens_after) == LIVE_OUTPUT_TOKENS, "a token went missing"
    return {
        "context_tokens": prompt_tokens, "downtime_ms": downtime_s * 1000,
        "itl_p50_ms": statistics.median(gaps) * 1000, "suspended_ms": final.suspended_us / 1000,
        "total_ms": total_s * 1000, "stages": final.stage, "mib_copied": final.bytes_copied / 2**20,
        "tokens_before": len(source_tokens),
    }


def plot_live(rows: list[dict[str, float]], path: Path) -> None:
    """Downtime (what the client sees) against the whole copy (what a blocking copy costs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(contexts, [r["total_ms"] for r in rows], "o-", label="whole copy (= a blocking copy's downtime)")
    ax.plot(contexts, [r["downtime_ms"] for r in rows], "o-", label="downtime the client sees (median)")
    ax.plot(contexts, [r["downtime_max_ms"] for r in rows], "x:", label="downtime, worst run")
    ax.plot(contexts, [r["itl_p50_ms"] for r in rows], "--", color="grey", label="normal token gap")
    ax.axhline(50, color="red", linewidth=0.8, label="target: 50 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms")
    ax.set_title("Live migration on loopback (qwen2.5-7b, 7 KiB of KV per token)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


async def run_live(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with tqdm(total=len(contexts) * args.repeat, desc="migrations", unit="run") as bar:
        for context in contexts:
            runs = []
            for _ in range(args.repeat):
                runs.append(await live_once(context, args.kv_scale))
                bar.update()
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            row["downtime_max_ms"] = max(r["downtime_ms"] for r in runs)
            rows.append(row)
            tqdm.write(json.dumps({k: round(v, 2) for k, v in row.items()}))
    plot_live(rows, Path(args.plot))
    first, last = rows[0], rows[-1]
    print(f"downtime {last['context_tokens']:.0f} / {first['context_tokens']:.0f} tokens: "
          f"{last['downtime_ms'] / first['downtime_ms']:.2f}x; total migration time: "
          f"{last['total_ms'] / first['total_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
