"""Simulator speed: simulated requests per wall second, peak memory, and linear growth.

Workload: the Azure LLM inference conversation trace (19,366 requests, 5.5 req/s) replayed
at 4x and 40x its rate on clusters of 4, 16 and 64 A100-80GB instances serving
llama-3-8b (default engine settings, default dispatch: least outstanding requests, live
load). Then one long run: the trace tiled in time to 1,000,000 requests at 40x on 64
instances, with the wall time recorded as requests finish (the growth curve, a PNG).

Each configuration runs in its own child process (one core, single-threaded), so the peak
resident memory it reports (`ru_maxrss`) is that run's alone. The baseline measured in the
same run is the simulator with fast-forward off (every iteration an event), on the first
`--ratio-requests` requests of each configuration; the ratio is on / off wall time for
the same simulated work (both produce the same records: tests/test_simulator.py).

    python bench/sim_speed.py                     # full: grid, ratios, 1M run, plot
    python bench/sim_speed.py --million 200000    # a shorter long run
    python bench/sim_speed.py --skip-million      # grid and ratios only
    python bench/sim_speed.py --baseline-rev 61bb560 --million 200000 --baseline-long
        # also run the simulator of that git revision (sim/, scheduler/, tokenyard/ extracted
        # to a temp dir) on every full-trace cell and the long run: the speed-up against
        # the old code on the same box in the same run, and a check that both give
        # identical records (a SHA-1 over every record)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TRACE = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / (
    "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
)
GPU = "A100-80GB"
MODEL = "llama-3-8b"


def tiled(rate_scale: float, total: int) -> Iterator[object]:
    """The trace repeated back to back in time (each copy shifted by the trace's span) until
    `total` requests; request ids get a `-<copy>` suffix."""
    from sim.traces import read_trace

    trace = read_trace(TRACE, rate_scale=rate_scale)
    emitted = 0
    copy = 0
    offset = 0.0
    while True:
        last = 0.0
        count = 0
        for req in trace:
            if emitted >= total:
                return
            last = req.arrival_s
            count += 1
            emitted += 1
            # The reader yields a new request object per row: shift and rename it in place.
            req.request_id = f"{req.request_id}-{copy}"
            req.arrival_s += offset
            yield req
        if count == 0:
            return
        offset += last + last / count  # one mean gap after the copy's last arrival
        copy += 1


def run_one(spec: dict[str, object]) -> dict[str, object]:
    """Child process: one simulation; returns its figures as JSON-able values."""
    if spec.get("code_root"):
        sys.path.insert(0, str(spec["code_root"]))  # the baseline's sim/ and scheduler/
    import hashlib

    from sim.cluster import parse_cluster
    from sim.simulator import simulate

    cluster = parse_cluster(
        {"pools": [{"name": "a100", "gpu": GPU, "model": MODEL, "count": spec["instances"]}]}, "bench"
    )
    requests = int(spec["requests"])  # type: ignore[call-overload]
    curve: list[tuple[float, int]] = []
    wall0 = time.perf_counter()

    def progress(sim_now_s: float, finished: int, total: int) -> None:
        curve.append((time.perf_counter() - wall0, finished))

    if spec.get("code_root"):
        import sim as sim_package
        import sim.engine_core

        assert str(sim_package.__file__).startswith(str(spec["code_root"])), sim_package.__file__
        compiled = not str(sim.engine_core.__file__).endswith(".py")
        assert bool(spec.get("native")) == compiled, sim.engine_core.__file__
    result = simulate(
        cluster,
        tiled(float(spec["rate"]), requests),  # type: ignore[arg-type]
        fast_forward=bool(spec["fast_forward"]),
        progress=progress if spec.get("curve") else None,
        total_requests=requests,
    )
    wall = time.perf_counter() - wall0
    done = [r for r in result.records if not r.rejected]
    ttfts = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    digest = hashlib.sha1()
    for r in result.records:
        digest.update(repr((r.request_id, r.instance_id, r.first_token_s, r.finish_s, r.output_tokens,
                            r.cached_prompt_tokens, r.preemptions, r.rejected)).encode())
    return {
        **spec,
        "records_sha1": digest.hexdigest(),
        "wall_s": wall,
        "sim_wall_s": result.wall_s,
        "records": len(result.records),
        "rejected": len(result.records) - len(done),
        "events": result.events,
        "sim_span_s": result.end_s - result.start_s,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "curve": curve,
    }


def in_child(spec: dict[str, object]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def extract_baseline(rev: str) -> Path:
    """The simulator of git revision `rev` in a temp dir (only the packages a child imports)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sim_speed_baseline_"))
    archive = subprocess.run(["git", "archive", rev, "sim", "scheduler", "tokenyard"],
                             check=True, capture_output=True, cwd=REPO_ROOT).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def plot(curve: list[tuple[float, int]], path: Path, title: str,
         baseline: list[tuple[float, int]] | None = None, baseline_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    walls = [w for w, _ in curve]
    counts = [n for _, n in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(counts, walls, lw=1.8, label="measured")
    if baseline:
        ax.plot([n for _, n in baseline], [w for w, _ in baseline], lw=1.4, color="tab:red", label=baseline_label)
    if counts and counts[-1] > 0:
        # Straight line through the origin and the end point: linear growth lies on it.
        ax.plot([0, counts[-1]], [0, walls[-1]], ls="--", lw=1, color="grey", label="linear (origin to end)")
    ax.set_xlabel("requests finished")
    ax.set_ylabel("wall time (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 40.0])
    parser.add_argument("--instances", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--ratio-requests", type=int, default=3000,
                        help="requests per configuration for the fast-forward on/off ratio")
    parser.add_argument("--million", type=int, default=1_000_000, help="requests of the long run")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--skip-grid", action="store_true", help="only the long run")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of wall time vs requests (default: docs/img/sim_speed.png for the "
                             "documented 1M run, else a file in the temp folder, so that a shorter "
                             "run never replaces the committed figure)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--baseline-rev", help="git revision whose simulator is also run on each full-trace cell")
    parser.add_argument("--baseline-long", action="store_true", help="also run the baseline on the long run")
    parser.add_argument("--native", action="store_true",
                        help="run every configuration (not the baseline) on the mypyc-compiled engine core "
                             "and event loop (sim/native.py; the same source, built into a cache folder)")
    args = parser.parse_args()
    if args.plot is None:
        name = "sim_speed_native.png" if args.native else "sim_speed.png"
        args.plot = (REPO_ROOT / "docs" / "img" / name if args.million == 1_000_000
                     else Path(tempfile.gettempdir()) / f"{args.million}_{name}")
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    from tqdm import tqdm

    trace_rows = sum(1 for _ in TRACE.open()) - 1
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}; trace {TRACE.name} ({trace_rows} requests)")
    results: list[dict[str, object]] = []
    base_root = extract_baseline(args.baseline_rev) if args.baseline_rev else None
    native: dict[str, object] = {}
    if args.native:
        from sim.native import build

        native = {"code_root": str(build(quiet=False)), "native": True}
        print(f"# native: mypyc-compiled sim.engine_core and sim.simulator from {native['code_root']}")
    grid = [] if args.skip_grid else [(r, n) for r in args.rates for n in args.instances]
    for rate, n in tqdm(grid, desc="grid", unit="config"):
        full = in_child({"rate": rate, "instances": n, "requests": trace_rows, "fast_forward": True, **native})
        on = in_child({"rate": rate, "instances": n, "requests": args.ratio_requests, "fast_forward": True,
                       **native})
        off = in_child({"rate": rate, "instances": n, "requests": args.ratio_requests, "fast_forward": False,
                        **native})
        full["ff_ratio"] = float(off["wall_s"]) / float(on["wall_s"])  # type: ignore[arg-type]
        full["ff_events_ratio"] = int(off["events"]) / int(on["events"])  # type: ignore[call-overload]
        if base_root is not None:
            old = in_child({"rate": rate, "instances": n, "requests": trace_rows, "fast_forward": True,
                            "code_root": str(base_root)})
            full["baseline_wall_s"] = old["wall_s"]
            full["baseline_rss_mb"] = old["peak_rss_mb"]
            full["same_records"] = old["records_sha1"] == full["records_sha1"]
        results.append(full)
    print()
    print("| rate | instances | requests | sim span s | wall s | sim req/s | events | peak RSS MB "
          "| ff on/off speed-up | events off/on | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rate']:g}x | {r['instances']} | {r['records']} | {r['sim_span_s']:.0f} | {r['wall_s']:.1f} "
              f"| {int(r['records']) / float(r['wall_s']):.0f} | {r['events']} | {r['peak_rss_mb']:.0f} "  # type: ignore[call-overload, arg-type]
              f"| {r['ff_ratio']:.1f}x | {r['ff_events_ratio']:.1f}x | {r['ttft_p50_s']:.3f} |")
    if base_root is not None:
        print(f"\nagainst {args.baseline_rev} (same trace, same box, this run):")
        print("| rate | instances | wall s | baseline wall s | speed-up | peak RSS MB | baseline RSS MB | same records |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['rate']:g}x | {r['instances']} | {r['wall_s']:.1f} | {r['baseline_wall_s']:.1f} "
                  f"| {float(r['baseline_wall_s']) / float(r['wall_s']):.2f}x | {r['peak_rss_mb']:.0f} "  # type: ignore[arg-type]
                  f"| {r['baseline_rss_mb']:.0f} | {r['same_records']} |")
    long: dict[str, object] | None = None
    if not args.skip_million:
        print(f"\nlong run: {args.million} requests, 40x, 64 instances ...", flush=True)
        long = in_child({"rate": 40.0, "instances": 64, "requests": args.million, "fast_forward": True,
                         "curve": True, **native})
        curve = [(float(w), int(n)) for w, n in long["curve"]]  # type: ignore[attr-defined]
        old_long: dict[str, object] | None = None
        if base_root is not None and args.baseline_long:
            print(f"baseline long run ({args.baseline_rev}) ...", flush=True)
            old_long = in_child({"rate": 40.0, "instances": 64, "requests": args.million, "fast_forward": True,
                                 "curve": True, "code_root": str(base_root)})
            long["baseline"] = old_long
        title = f"{args.million:,} Azure-conv requests at 40x on 64 x {GPU} ({MODEL})"
        plot(curve, args.plot, title + (" [mypyc]" if native else ""),
             [(float(w), int(n)) for w, n in old_long["curve"]] if old_long else None,  # type: ignore[attr-defined]
             f"baseline {args.baseline_rev}")
        half = next((w for w, n in curve if n >= args.million // 2), None)
        wall = float(long["wall_s"])  # type: ignore[arg-type]
        print("| requests | wall s | sim req/s | events | peak RSS MB | wall at half s | 2nd half / 1st half |")
        print("|---|---|---|---|---|---|---|")
        ratio = (wall - half) / half if half else float("nan")
        print(f"| {long['records']} | {wall:.1f} | {int(long['records']) / wall:.0f} | {long['events']} "  # type: ignore[call-overload]
              f"| {long['peak_rss_mb']:.0f} | {half or float('nan'):.1f} | {ratio:.2f} |")
        if old_long is not None:
            old_wall = float(old_long["wall_s"])  # type: ignore[arg-type]
            print(f"baseline {args.baseline_rev}: {old_wall:.1f} s ({int(old_long['records']) / old_wall:.0f} req/s), "  # type: ignore[call-overload]
                  f"peak RSS {old_long['peak_rss_mb']:.0f} MB; speed-up {old_wall / wall:.2f}x; "
                  f"same records: {old_long['records_sha1'] == long['records_sha1']}")
        print(f"plot: {args.plot.relative_to(REPO_ROOT) if args.plot.is_relative_to(REPO_ROOT) else args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"grid": results, "long": long}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
