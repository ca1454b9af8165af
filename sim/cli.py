"""`tokenyard sim run|compare|sweep`: replay a trace against a cluster YAML and report.

    tokenyard sim run cluster.yaml --trace conv.csv --rate-scale 4 --out runs/conv4
    tokenyard sim compare cluster.yaml --trace conv.csv --policy round_robin --policy least_kv
    tokenyard sim sweep cluster.yaml --trace conv.csv --rate-scales 1,2,4 --pool-counts a100=1,2,4

Every run is one `SimJob` (plain values, so it pickles into worker processes and Ray
tasks): load the cluster, apply the policy preset and pool counts, open the trace, simulate,
summarise. Bad input (cluster YAML, trace, arguments) prints one line naming what, where and
what was expected, and exits 2; outputs are written only after a run succeeds, each through
a temporary file renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
RAY_INSTALL_HINT = "pip install 'ray[default]'"


class UsageError(ValueError):
    """A bad command-line value; the message names the option and what was expected."""


# -- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceOptions:
    path: str
    fmt: str = "auto"
    rate_scale: float = 1.0
    window_s: tuple[float, float] | None = None
    limit: int | None = None
    skip_bad_rows: bool = False
    sort: bool = False
    clients: tuple[int, ...] | None = None
    seed: int = 0

    def open(self) -> Any:
        from sim.traces import read_trace

        return read_trace(self.path, self.fmt, rate_scale=self.rate_scale, window_s=self.window_s,
                          skip_bad_rows=self.skip_bad_rows, limit=self.limit, sort=self.sort,
                          seed=self.seed, clients=self.clients)


@dataclass(frozen=True)
class SimJob:
    """One simulation: a cluster file, optionally a dispatch preset and pool sizes, a trace."""

    cluster_path: str
    trace: TraceOptions
    policy: str | None = None  # a preset name from sim.cluster.DISPATCH_PRESETS, None = as configured
    pool_counts: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    timeline_interval_s: float = 10.0
    label: str = ""
    keep_result: bool = True  # False: return only the summary (sweeps in worker processes)
    rank_tau: float | None = None  # predicted ranks of prompt-less requests at this tau (sim.rank_noise)
    factors_path: str | None = None  # engine-model factors file (`--factors`); None: packaged
    model: str | None = None  # `--model`: the model of trace rows that name none (e.g. the tier alias)
    tier_auc: float | None = None  # tier scores of prompt-less requests at this ROC AUC (sim.tier_noise)
    tier_small_ok_share: float | None = None  # their share whose small answer suffices


@dataclass
class JobOutcome:
    job: SimJob
    summary: dict[str, Any]
    trace_counts: dict[str, Any]
    result: Any = None  # SimResult when job.keep_result
    slo_classes: dict[str, Any] = field(default_factory=dict)


def load_job_cluster(job: SimJob) -> Any:
    from sim.cluster import load_cluster, policy_variants

    cluster = load_cluster(job.cluster_path)
    if job.policy is not None:
        cluster = policy_variants(cluster, [job.policy])[0]
    if job.pool_counts:
        cluster = with_pool_counts(cluster, dict(job.pool_counts))
    if job.factors_path:
        from scheduler.engine_model import load_factors_file
        from sim.cluster import with_factors

        try:
            cluster = with_factors(cluster, load_factors_file(job.factors_path))
        except ValueError as exc:
            raise UsageError(f"--factors: {exc}") from exc
    return cluster


def with_pool_counts(cluster: Any, counts: dict[str, int]) -> Any:
    """A copy of the cluster with some pools resized."""
    names = [p.name for p in cluster.pools]
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise UsageError(f"--pool-counts: unknown pool(s) {', '.join(unknown)}; the cluster "
                         f"{cluster.source} has pools: {', '.join(names)}")
    pools = tuple(dataclasses.replace(p, count=counts[p.name]) if p.name in counts else p for p in cluster.pools)
    if sum(p.count for p in pools) == 0:
        raise UsageError("--pool-counts: every pool would have 0 instances; expected at least one instance")
    return dataclasses.replace(cluster, pools=pools)


def _non_empty(requests: Iterable[Any], what: str) -> Iterator[Any]:
    """The requests, or a UsageError now if there are none (a window or limit took them all)."""
    iterator = iter(requests)
    first = next(iterator, None)
    if first is None:
        raise UsageError(f"{what}: no requests to simulate (check --window, --limit and the file)")
    return itertools.chain([first], iterator)


def run_job(job: SimJob, progress: Callable[..., None] | None = None) -> JobOutcome:
    """Simulate one job and summarise it (in this process)."""
    from sim.report import summarize
    from sim.simulator import simulate

    cluster = load_job_cluster(job)
    trace = job.trace.open()
    requests = _non_empty(trace, job.trace.path)
    from sim.rank_noise import ranker_for

    ranker = ranker_for(cluster.queue_policy, job.trace.open, job.rank_tau, job.seed)
    if job.model is not None:
        requests = (r if r.model else dataclasses.replace(r, model=job.model) for r in requests)
    tier_noise = None
    if job.tier_auc is not None or job.tier_small_ok_share is not None:
        from sim.tier_noise import TierNoise

        tier_noise = TierNoise(0.5 if job.tier_auc is None else job.tier_auc, job.tier_small_ok_share)
    result = simulate(cluster, requests, progress=progress, seed=job.seed,
                      timeline_interval_s=job.timeline_interval_s, ranker=ranker, tier_noise=tier_noise)
    if not result.policy:
        result.policy = job.label or job.policy or "configured"
    slo_classes = dict(cluster.slo_classes)
    summary = summarize(result, slo_classes)
    summary["label"] = job.label
    summary["trace"] = {"path": job.trace.path, "format": trace.fmt, "rate_scale": job.trace.rate_scale,
                        "window_s": list(job.trace.window_s) if job.trace.window_s else None,
                        **trace.counts.as_dict()}
    summary["cluster"] = {"path": job.cluster_path,
                          "pools": {p.name: p.count for p in cluster.pools}}
    return JobOutcome(job, summary, trace.counts.as_dict(),
                      result if job.keep_result else None, slo_classes)


def _run_job_quiet(job: SimJob) -> JobOutcome:
    """Worker-process entry point: no progress bar, errors travel back as exceptions."""
    return run_job(job, progress=None)


class SimProgressBar:
    """A tqdm bar over simulated seconds: shows simulated time and sim-seconds per wall second.

    Passed to `simulate(progress=...)`, which calls it as `(sim_now_s, finished, total)`.
    """

    def __init__(self, label: str, total_s: float | None, enabled: bool = True) -> None:
        from tqdm import tqdm

        bar_format = ("{desc}: {percentage:3.0f}%|{bar}| t={n:.0f}/{total:.0f} sim-s [{elapsed}<{remaining}, "
                      "{rate_fmt}{postfix}]" if total_s else
                      "{desc}: t={n:.0f} sim-s [{elapsed}, {rate_fmt}{postfix}]")
        self.bar = tqdm(total=total_s, desc=label, unit="sim-s", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5, bar_format=bar_format)
        self.last_s = 0.0

    def __call__(self, now_s: float, finished: int | None = None, total: int | None = None) -> None:
        if now_s > self.last_s:
            step = now_s - self.last_s
            if self.bar.total:
                step = min(step, max(0.0, self.bar.total - self.bar.n))
            self.bar.update(step)
            self.last_s = now_s
        if finished is not None:
            self.bar.set_postfix_str(f"done {finished}/{total if total is not None else '?'}", refresh=False)

    def close(self) -> None:
        self.bar.close()


# -- argument parsing ----------------------------------------------------------------------


def _parse_window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        start_text, end_text = text.split(":", 1)
        start = float(start_text) if start_text else 0.0
        end = float(end_text) if end_text else float("inf")
    except ValueError:
        raise UsageError(f"--window: expected START:END in seconds (e.g. 600:1200, or 600:), got {text!r}") from None
    if not (0 <= start < end):
        raise UsageError(f"--window: expected 0 <= START < END, got {text!r}")
    return start, end


def _parse_float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated numbers like 1,2,4, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option}: expected positive numbers like 1,2,4, got {text!r}")
    return values


def _parse_pool_counts(specs: Sequence[str]) -> list[tuple[str, list[int]]]:
    parsed: list[tuple[str, list[int]]] = []
    for spec in specs:
        name, sep, counts = spec.partition("=")
        try:
            values = [int(part) for part in counts.split(",") if part.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v < 0 for v in values):
            raise UsageError(f"--pool-counts: expected POOL=N[,N...] with counts >= 0 (e.g. a100=1,2,4), got {spec!r}")
        parsed.append((name, values))
    return parsed


def _parse_clients(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--clients: expected comma-separated ServeGen client numbers, got {text!r}") from None


def _trace_options(args: argparse.Namespace, rate_scale: float | None = None) -> TraceOptions:
    if not (args.rate_scale > 0 and math.isfinite(args.rate_scale)):
        raise UsageError(f"--rate-scale: expected a positive number, got {args.rate_scale}")
    if not (args.timeline_interval > 0 and math.isfinite(args.timeline_interval)):
        raise UsageError(f"--timeline-interval: expected a positive number of seconds, got {args.timeline_interval}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: expected a positive number of requests, got {args.limit}")
    return TraceOptions(
        path=args.trace, fmt=args.format, rate_scale=rate_scale if rate_scale is not None else args.rate_scale,
        window_s=_parse_window(args.window), limit=args.limit, skip_bad_rows=args.skip_bad_rows,
        sort=args.sort, clients=_parse_clients(args.clients), seed=args.seed)


def _add_trace_arguments(parser: argparse.ArgumentParser, rate_scale: bool = True) -> None:
    from sim.traces import FORMATS

    group = parser.add_argument_group("trace")
    group.add_argument("--trace", required=True, metavar="FILE",
                       help="trace file (Azure CSV, BurstGPT CSV, Mooncake JSONL, plain CSV/JSONL) "
                            "or a ServeGen folder / chunk-<client>-trace.csv")
    group.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                       help="trace format (default: detected from the extension and header)")
    if rate_scale:
        group.add_argument("--rate-scale", type=float, default=1.0, metavar="X",
                           help="replay X times faster (4 = 4x the trace's arrival rate; default 1)")
    else:
        parser.set_defaults(rate_scale=1.0)
    group.add_argument("--window", metavar="START:END",
                       help="only rows with START <= t < END seconds from the trace start (before scaling)")
    group.add_argument("--limit", type=int, metavar="N", help="at most N requests")
    group.add_argument("--skip-bad-rows", action="store_true",
                       help="skip and count malformed rows instead of stopping at the first")
    group.add_argument("--sort", action="store_true",
                       help="sort rows by timestamp (reads the whole trace into memory); "
                            "default: out-of-order rows are errors")
    group.add_argument("--clients", metavar="N,N", help="ServeGen: client numbers to generate (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for randomised policies and ServeGen generation (default 0)")
    from sim.rank_noise import parse_tau

    parser.add_argument("--rank-tau", type=parse_tau, default=None, metavar="TAU",
                        help="give requests without prompt text predicted output-length ranks of Kendall "
                             "tau TAU (noise model, docs/ranking.md); prompts are scored by the real ranker")
    from sim.tier_noise import parse_auc, parse_share

    parser.add_argument("--tier-auc", type=parse_auc, default=None, metavar="AUC",
                        help="requests for the tier alias with neither a p_small_ok nor a prompt get tier "
                             "scores of ROC AUC AUC against hidden small-ok labels (noise model, docs/tiers.md; "
                             "default 0.5: no information)")
    parser.add_argument("--tier-small-ok-share", type=parse_share, default=None, metavar="SHARE",
                        help="share of those requests whose small-tier answer suffices (default: the tier "
                             "model's training share)")
    parser.add_argument("--out", metavar="DIR", default="sim-out",
                        help="folder for the summary, records and plots (default: ./sim-out)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--factors", metavar="JSON", default=None,
                        help="engine-model factors written by `tokenyard calibrate --write` "
                             "(default: the packaged scheduler/perf_factors.json)")
    parser.add_argument("--timeline-interval", type=float, default=10.0, metavar="S",
                        help="sample cluster load every S simulated seconds for the load plot (default 10)")
    parser.add_argument("--native", action="store_true",
                        help="run on the engine core and event loop compiled with mypyc (same source, "
                             "~1.5x faster; built once into ~/.cache/tokenyard/native, needs a C compiler)")


def register(subparsers: Any) -> None:
    sim_parser = subparsers.add_parser(
        "sim", help="replay a trace against a simulated cluster (run, compare policies, sweep)",
        description="Discrete-event simulation of an LLM serving cluster described in YAML, "
                    "driven by a production trace, running the same scheduler code as the router.")
    sim_sub = sim_parser.add_subparsers(dest="sim_command", metavar="ACTION", required=True)

    run = sim_sub.add_parser("run", help="simulate one cluster on one trace",
                             description="Simulate CLUSTER on the trace, print the summary and write "
                                         "summary.json, records.parquet and PNG plots under --out.")
    run.add_argument("cluster", metavar="CLUSTER.yaml")
    _add_trace_arguments(run)
    run.add_argument("--policy", metavar="NAME",
                     help="replace the cluster's dispatch policy with a preset (round_robin, least_kv, ...)")
    run.add_argument("--model", metavar="NAME", default=None,
                     help="model of trace rows that name none (default: the cluster's default_model); "
                          "the tier alias (policy document `tiers:`, e.g. auto) routes them by tier")
    run.add_argument("--summary-json", metavar="FILE", help="also write the summary JSON here")
    run.add_argument("--records", metavar="FILE",
                     help="per-request records file, .parquet or .csv (default: OUT/records.parquet)")
    run.set_defaults(handler=_cmd_run)

    compare = sim_sub.add_parser(
        "compare", help="run several dispatch policies (and/or cluster files) on the same trace",
        description="One run per (cluster file, --policy) pair on the same trace; prints one table "
                    "and writes overlaid latency CDFs and compare.json under --out.")
    compare.add_argument("clusters", metavar="CLUSTER.yaml", nargs="+")
    _add_trace_arguments(compare)
    compare.add_argument("--policy", action="append", metavar="NAME", default=None,
                         help="a dispatch preset (repeat for several); 'configured' = as in the file")
    compare.add_argument("--workers", type=int, default=1, metavar="N",
                         help="run the comparisons in N worker processes (default 1)")
    compare.set_defaults(handler=_cmd_compare)

    sweep = sim_sub.add_parser(
        "sweep", help="a grid of arrival-rate scales and pool sizes, in parallel",
        description="Simulate every (rate scale, pool counts) combination in worker processes "
                    "(or on a Ray cluster with --ray), print a table and plot goodput and p99 "
                    "latency against the rate.")
    sweep.add_argument("cluster", metavar="CLUSTER.yaml")
    _add_trace_arguments(sweep, rate_scale=False)
    sweep.add_argument("--rate-scales", default="1", metavar="X,X", help="arrival-rate scales, e.g. 1,2,4")
    # Without this, argparse took `--rate-scale 2` (run's and compare's flag) as an
    # abbreviation of --rate-scales, silently replacing a --rate-scales given before it.
    sweep.add_argument("--rate-scale", dest="single_rate_scale", default=None, help=argparse.SUPPRESS)
    sweep.add_argument("--pool-counts", action="append", default=[], metavar="POOL=N,N",
                       help="instance counts to try for a pool, e.g. a100=1,2,4 (repeat for more pools)")
    sweep.add_argument("--policy", metavar="NAME", help="dispatch preset for every point")
    sweep.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes (default: CPU count, at most the grid size)")
    sweep.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                       help="run the grid on a Ray cluster: ADDRESS (HOST:PORT or ray://HOST:10001), "
                            "none for the one RAY_ADDRESS or a local head names, or 'local' to start "
                            f"one on this machine; needs ray: {RAY_INSTALL_HINT}")
    sweep.set_defaults(handler=_cmd_sweep)


# -- handlers ------------------------------------------------------------------------------


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from scheduler.dispatch_parts import PolicyConfigError
    from sim.traces import TraceError
    from tokenyard.config import ConfigError

    return (ConfigError, TraceError, PolicyConfigError, UsageError, ValueError, OSError)


def _fail(command: str, exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"tokenyard sim {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(command: str, body: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    if args is not None and getattr(args, "native", False):
        from sim import native

        if not os.environ.get(native.ROOT_ENV):
            try:
                return native.reexec_on_native(list(getattr(args, "argv", sys.argv[1:])))
            except native.NativeBuildError as exc:
                print(f"tokenyard sim {command}: error: --native: {exc}", file=sys.stderr)
                return 1
        if not native.active():
            print(f"tokenyard sim {command}: error: --native: the compiled modules in "
                  f"{os.environ[native.ROOT_ENV]} were not imported", file=sys.stderr)
            return 1
        log.info("native simulator active", extra={"root": os.environ[native.ROOT_ENV]})
    try:
        return body()
    except _bad_input_errors() as exc:
        log.debug("sim %s failed", command, exc_info=True)
        return _fail(command, exc)


def _check_model_option(cluster: Any, model: str | None) -> None:
    """`--model` must be a served model or the policy document's tier alias."""
    if model is None:
        return
    known = {p.model.name.lower(): p.model.name for p in cluster.pools}
    tiers = cluster.policy.tiers if cluster.policy is not None else None
    if tiers is not None:
        known[tiers.alias.lower()] = tiers.alias
    if model.lower() not in known:
        raise UsageError(f"--model: no pool serves {model!r} and it is not the tier alias; "
                         f"expected one of: {', '.join(sorted(known.values()))}")


def _cmd_run(args: argparse.Namespace) -> int:
    return _guarded("run", lambda: _run(args), args)


def _run(args: argparse.Namespace) -> int:
    from sim.report import (
        check_output_path,
        format_summary,
        plot_latency_cdfs,
        plot_load_over_time,
        write_json,
        write_records,
    )

    trace = _trace_options(args)
    if args.records and Path(args.records).suffix.lower() not in (".parquet", ".csv"):
        raise UsageError(f"--records: expected a file ending in .parquet or .csv, got {args.records!r}")
    check_output_path(args.out, "--out", folder=True)  # before the run, not after it
    if args.summary_json:
        check_output_path(args.summary_json, "--summary-json")
    if args.records:
        check_output_path(args.records, "--records")
    job = SimJob(cluster_path=args.cluster, trace=trace, policy=args.policy, seed=args.seed,
                 timeline_interval_s=args.timeline_interval, label=args.policy or "", rank_tau=args.rank_tau, factors_path=args.factors,
                 model=args.model, tier_auc=args.tier_auc, tier_small_ok_share=args.tier_small_ok_share)
    _check_model_option(load_job_cluster(job), args.model)  # fail on a bad cluster before reading the trace
    trace.open()  # and on a bad trace header before simulating
    total_s = None
    if trace.window_s is not None and trace.window_s[1] != float("inf"):
        total_s = (trace.window_s[1] - trace.window_s[0]) / trace.rate_scale
    bar = SimProgressBar(Path(args.cluster).stem, total_s, enabled=not args.no_progress)
    started = time.perf_counter()
    try:
        outcome = run_job(job, progress=bar)
    finally:
        bar.close()
    log.info("simulation finished", extra={"wall_s": round(time.perf_counter() - started, 3),
                                            "requests": outcome.summary["requests"]})
    summary = outcome.summary
    out = Path(args.out)
    write_json(summary, out / "summary.json")
    written = [out / "summary.json"]
    if args.summary_json:
        write_json(summary, args.summary_json)
        written.append(Path(args.summary_json))
    records_path = Path(args.records) if args.records else out / "records.parquet"
    written.append(write_records(outcome.result, records_path, outcome.slo_classes))
    if not args.no_plots:
        label = summary.get("policy") or "run"
        written.append(plot_latency_cdfs({label: outcome.result}, out / "latency_cdfs.png"))
        written.append(plot_load_over_time(outcome.result, out / "load_over_time.png"))
    print(format_summary(summary))
    unknown = sorted(set(summary["slo"]) - set(outcome.slo_classes))
    if unknown and outcome.slo_classes:
        fallback = ("the targets of class 'default'" if "default" in outcome.slo_classes
                    else "no targets (the cluster has no class 'default')")
        print(f"note: the trace names SLO class(es) {', '.join(map(repr, unknown))} that the cluster's policy "
              f"document does not define ({', '.join(sorted(outcome.slo_classes))}); their requests were "
              f"measured against {fallback}")
    reasons = rejection_reasons(outcome.result.records)
    if reasons:
        print("rejected: " + "; ".join(f"{n} x {reason}" for reason, n in reasons))
    counts = outcome.trace_counts
    if counts["skipped_total"]:
        print(f"trace: skipped {counts['skipped_total']} row(s): "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts["skipped"].items())))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def rejection_reasons(records: Iterable[Any], shown: int = 3) -> list[tuple[str, int]]:
    """Why requests were refused, most common first (at most `shown`, each reason cut at
    160 characters): the summary counts rejections, this says what they were."""
    counts: dict[str, int] = {}
    for record in records:
        if record.rejected:
            reason = record.reject_reason or "no reason recorded"
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:shown]


def _map_jobs(jobs: Sequence[SimJob], workers: int, label: str, progress: bool) -> list[JobOutcome]:
    """Run jobs in `workers` processes (in this process when 1), in job order."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=label, unit="run", disable=not progress, file=sys.stderr)
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    try:
        if workers <= 1 or len(jobs) == 1:
            for i, job in enumerate(jobs):
                outcomes[i] = _run_job_quiet(job)
                bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = {pool.submit(_run_job_quiet, job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    outcomes[futures[future]] = future.result()
                    bar.update(1)
    finally:
        bar.close()
    return [o for o in outcomes if o is not None]


def _cmd_compare(args: argparse.Namespace) -> int:
    return _guarded("compare", lambda: _compare(args), args)


def _compare(args: argparse.Namespace) -> int:
    from sim.report import check_output_path, comparison_table, plot_latency_cdfs, write_json

    trace = _trace_options(args)
    check_output_path(args.out, "--out", folder=True)
    policies: list[str | None] = list(args.policy) if args.policy else [None]
    if args.workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {args.workers}")
    jobs: list[SimJob] = []
    stems = [Path(c).stem for c in args.clusters]
    for cluster_path, stem in zip(args.clusters, stems, strict=True):
        for policy in policies:
            name = policy or "configured"
            label = f"{stem}/{name}" if len(args.clusters) > 1 else name
            job = SimJob(cluster_path=cluster_path, trace=trace, policy=policy, seed=args.seed,
                         timeline_interval_s=args.timeline_interval, label=label, rank_tau=args.rank_tau, factors_path=args.factors,
                         tier_auc=args.tier_auc, tier_small_ok_share=args.tier_small_ok_share)
            load_job_cluster(job)  # every cluster and policy name is checked before any run
            jobs.append(job)
    labels = [j.label for j in jobs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate runs {sorted({x for x in labels if labels.count(x) > 1})}; "
                         "give each --policy once and cluster files with different names")
    trace.open()
    outcomes = _map_jobs(jobs, args.workers, "compare", not args.no_progress)
    summaries = {o.job.label: o.summary for o in outcomes}
    table = comparison_table(summaries)
    out = Path(args.out)
    written = [out / "compare.json"]
    write_json({"runs": summaries, "table": table.splitlines()}, out / "compare.json")
    if not args.no_plots:
        written.append(plot_latency_cdfs({o.job.label: o.result for o in outcomes}, out / "latency_cdfs.png"))
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    return _guarded("sweep", lambda: _sweep(args), args)


def sweep_jobs(args: argparse.Namespace) -> list[SimJob]:
    if getattr(args, "single_rate_scale", None) is not None:
        raise UsageError("--rate-scale: sweep takes --rate-scales X,X,... (the grid's rates; e.g. --rate-scales "
                         f"{args.single_rate_scale})")
    rates = _parse_float_list(args.rate_scales, "--rate-scales")
    pool_grid = _parse_pool_counts(args.pool_counts)
    names = [name for name, _ in pool_grid]
    if len(set(names)) != len(names):
        raise UsageError(f"--pool-counts: pool given more than once: {names}")
    combos = list(itertools.product(*(counts for _, counts in pool_grid))) or [()]
    jobs: list[SimJob] = []
    for combo in combos:
        pool_counts = tuple(zip(names, combo, strict=True))
        series = ",".join(f"{n}={c}" for n, c in pool_counts) or "as configured"
        for rate in rates:
            job = SimJob(cluster_path=args.cluster, trace=_trace_options(args, rate_scale=rate),
                         policy=args.policy, pool_counts=pool_counts, seed=args.seed,
                         timeline_interval_s=args.timeline_interval,
                         label=f"{series} x{rate:g}", keep_result=False, rank_tau=args.rank_tau, factors_path=args.factors,
                         tier_auc=args.tier_auc, tier_small_ok_share=args.tier_small_ok_share)
            jobs.append(job)
    return jobs


def _sweep(args: argparse.Namespace) -> int:
    from sim.report import check_output_path, comparison_table, plot_sweep, write_json

    check_output_path(args.out, "--out", folder=True)
    ray: ModuleType | None = None
    if args.ray is not None:
        try:
            import ray  # an optional dependency at run time (the dev extras install it)
        except ImportError:
            print("tokenyard sim sweep: error: --ray needs the optional dependency ray, which is not "
                  f"installed; install it with: {RAY_INSTALL_HINT}", file=sys.stderr)
            return EXIT_BAD_INPUT
    jobs = sweep_jobs(args)
    for job in jobs:
        if job.pool_counts or job is jobs[0]:
            load_job_cluster(job)  # bad cluster, policy or pool names fail before any run
    jobs[0].trace.open()
    if ray is not None:
        outcomes = _run_on_ray(ray, jobs, args.ray, not args.no_progress)
    else:
        import os

        workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, len(jobs))
        if workers < 1:
            raise UsageError(f"--workers: expected at least 1, got {workers}")
        outcomes = _map_jobs(jobs, workers, "sweep", not args.no_progress)
    points = []
    for outcome in outcomes:
        series = ",".join(f"{n}={c}" for n, c in outcome.job.pool_counts) or "as configured"
        points.append({"series": series, "rate_scale": outcome.job.trace.rate_scale,
                       "pool_counts": dict(outcome.job.pool_counts), "summary": outcome.summary})
    table = comparison_table({o.job.label: o.summary for o in outcomes})
    out = Path(args.out)
    written = [out / "sweep.json"]
    write_json({"points": points, "table": table.splitlines()}, out / "sweep.json")
    if not args.no_plots:
        written.append(plot_sweep(points, out / "sweep.png"))
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _run_on_ray(ray: Any, jobs: Sequence[SimJob], address: str, progress: bool) -> list[JobOutcome]:
    """The same jobs as Ray tasks; the cluster and trace paths must be readable on the workers."""
    from tqdm import tqdm

    try:
        ray.init(address=None if address in ("", "local") else address, ignore_reinit_error=True,
                 log_to_driver=False)
    except ConnectionError as exc:
        where = "the cluster RAY_ADDRESS or a local head names" if address == "auto" else repr(address)
        raise UsageError(
            f"--ray: cannot reach a Ray cluster at {where} ({str(exc).splitlines()[0]}); start one with "
            "`ray start --head`, pass its address (--ray HOST:PORT or ray://HOST:10001), or use --ray local "
            "to start a Ray instance on this machine"
        ) from None
    remote = ray.remote(_run_job_quiet)
    refs = [remote.remote(job) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    pending = list(refs)
    with tqdm(total=len(jobs), desc="sweep (ray)", unit="run", disable=not progress, file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                outcomes[index[ref]] = ray.get(ref)
                bar.update(1)
    return [o for o in outcomes if o is not None]
