"""Reports on a run: the summary (stable field names, documented in docs/simulator.md),
per-request record files, comparison tables and PNG plots.

Everything here reads `sim.records` values only, so the same report serves a simulated run
and a live cross-check. Files are written through a temporary file in the same folder and
renamed into place, so a failed or interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.types import SloClass
from sim.records import RequestRecord, SimResult

SUMMARY_SCHEMA = "tokenyard.sim.summary/v1"
PERCENTILES = (50, 90, 99)

# derived per-request columns written next to the RequestRecord fields
_RECORD_FIELDS = (
    "request_id", "tenant", "slo_class", "model", "pool", "instance_id", "gpu", "arrival_s",
    "dispatch_s", "first_token_s", "finish_s", "input_tokens", "output_tokens",
    "cached_prompt_tokens", "preemptions", "rejected", "reject_reason", "ttft_slo_s", "tpot_slo_s",
)
_DERIVED_FIELDS = ("ttft_ms", "tpot_ms", "e2e_ms", "ttft_met", "tpot_met", "goodput")


# -- atomic files --------------------------------------------------------------------------


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output_path(path: str | Path, option: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a ValueError naming the
    option, the path and what was expected (a file where a folder must go, a folder where
    the file goes, a folder that cannot be written). Missing folders are fine: they are
    created when the output is written."""
    target = Path(path)
    if target.exists():
        if folder and not target.is_dir():
            raise ValueError(f"{option} {path}: is a file; expected a folder (created if missing)")
        if not folder and target.is_dir():
            raise ValueError(f"{option} {path}: is a folder; expected a file path")
    existing = (target if folder else target.parent).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, so no folder can be made there; expected a path "
                         "under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {existing} (permission denied); expected a writable "
                         "folder")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on any
    error it is removed, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; outputs get the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


# -- the summary ---------------------------------------------------------------------------


def _percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/mean/max in ms (values in s); None for an empty sample."""
    import numpy as np

    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "max": None}
    array = np.asarray(values, dtype=np.float64) * scale
    points = np.percentile(array, PERCENTILES)
    out: dict[str, float | None] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}
    out["mean"] = float(array.mean())
    out["max"] = float(array.max())
    return out


def _slo_targets(record: RequestRecord, slo_classes: Mapping[str, SloClass] | None) -> tuple[float, float]:
    """(ttft_slo_s, tpot_slo_s): the record's own targets if the driver set them, else its class's."""
    ttft_s, tpot_s = record.ttft_slo_s, record.tpot_slo_s
    slo = slo_classes.get(record.slo_class) if slo_classes else None
    if slo is not None:
        if math.isinf(ttft_s):
            ttft_s = slo.ttft_slo_ms / 1000.0
        if math.isinf(tpot_s):
            tpot_s = slo.tpot_slo_ms / 1000.0
    return ttft_s, tpot_s


def record_outcome(record: RequestRecord, slo_classes: Mapping[str, SloClass] | None = None
                   ) -> tuple[bool, bool]:
    """(ttft_met, tpot_met) against the record's targets (or its class's): a rejected
    request meets neither; TPOT counts only for a finished request."""
    ttft_slo_s, tpot_slo_s = _slo_targets(record, slo_classes)
    if record.rejected:
        return False, False
    ttft, tpot = record.ttft_s, record.tpot_s
    ttft_met = ttft is not None and ttft <= ttft_slo_s
    tpot_met = record.finish_s is not None and tpot is not None and tpot <= tpot_slo_s
    return ttft_met, tpot_met


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summarize(result: SimResult, slo_classes: Mapping[str, SloClass] | None = None) -> dict[str, Any]:
    """The run's summary as a JSON-ready dict; field names and units are documented in
    docs/simulator.md and do not change within a schema version (`schema`)."""
    records = result.records
    duration_s = max(0.0, result.end_s - result.start_s)
    completed = [r for r in records if not r.rejected and r.finish_s is not None]
    rejected = sum(1 for r in records if r.rejected)
    ttft_s = [r.ttft_s for r in records if not r.rejected and r.ttft_s is not None]
    tpot_s = [r.tpot_s for r in completed if r.output_tokens > 1 and r.tpot_s is not None]
    e2e_s = [r.e2e_s for r in completed if r.e2e_s is not None]

    per_class: dict[str, dict[str, Any]] = {}
    good = 0
    for record in records:
        ttft_slo_s, tpot_slo_s = _slo_targets(record, slo_classes)
        done = not record.rejected and record.finish_s is not None
        ttft_met, tpot_met = record_outcome(record, slo_classes)
        both = ttft_met and tpot_met
        good += both
        entry = per_class.setdefault(record.slo_class, {
            "requests": 0, "completed": 0, "ttft_met": 0, "tpot_met": 0, "both_met": 0,
            "ttft_slo_ms": _finite(ttft_slo_s * 1000.0), "tpot_slo_ms": _finite(tpot_slo_s * 1000.0)})
        entry["requests"] += 1
        entry["completed"] += done
        entry["ttft_met"] += ttft_met
        entry["tpot_met"] += tpot_met
        entry["both_met"] += both
    slo = {}
    for name in sorted(per_class):
        entry = per_class[name]
        slo[name] = {
            "requests": entry["requests"],
            "completed": entry["completed"],
            "ttft_slo_ms": entry["ttft_slo_ms"],
            "tpot_slo_ms": entry["tpot_slo_ms"],
            "ttft_attainment": _ratio(entry["ttft_met"], entry["requests"]),
            "tpot_attainment": _ratio(entry["tpot_met"], entry["requests"]),
            "both_attainment": _ratio(entry["both_met"], entry["requests"]),
        }

    pools: dict[str, dict[str, Any]] = {}
    hours = duration_s / 3600.0
    for inst in result.instances:
        pool = pools.setdefault(inst.pool, {
            "gpu": inst.gpu, "model": inst.model, "instances": 0, "gpus": 0, "gpu_hours": 0.0,
            "cost_usd": 0.0, "busy_s": 0.0, "kv_integral": 0.0, "preemptions": 0, "requests": 0})
        pool["instances"] += 1
        pool["gpus"] += inst.tp
        pool["gpu_hours"] += inst.tp * hours
        pool["cost_usd"] += inst.usd_per_hour * hours
        pool["busy_s"] += inst.busy_s
        pool["kv_integral"] += inst.kv_usage_time_integral
        pool["preemptions"] += inst.preemptions
        pool["requests"] += inst.requests
    pool_out: dict[str, dict[str, Any]] = {}
    for name in sorted(pools):
        pool = pools[name]
        instance_s = pool["instances"] * duration_s
        pool_out[name] = {
            "gpu": pool["gpu"], "model": pool["model"], "instances": pool["instances"],
            "gpus": pool["gpus"], "requests": pool["requests"],
            "gpu_hours": pool["gpu_hours"], "cost_usd": pool["cost_usd"],
            "busy_fraction": _ratio(pool["busy_s"], instance_s),
            "kv_utilization_mean": _ratio(pool["kv_integral"], instance_s),
            "preemptions": pool["preemptions"],
        }
    instance_s = len(result.instances) * duration_s
    dispatched = [r for r in records if not r.rejected]
    prompt_tokens = sum(r.input_tokens for r in dispatched)
    output_tokens = sum(r.output_tokens for r in completed)
    preemptions = sum(inst.preemptions for inst in result.instances)
    if not result.instances:
        preemptions = sum(r.preemptions for r in records)
    wall_s = result.wall_s

    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "policy": result.policy,
        "requests": len(records),
        "completed": len(completed),
        "rejected": rejected,
        "unfinished": len(records) - len(completed) - rejected,
        "duration_s": duration_s,
        "throughput_rps": _ratio(len(completed), duration_s),
        "input_tokens_per_s": _ratio(sum(r.input_tokens for r in completed), duration_s),
        "output_tokens_per_s": _ratio(output_tokens, duration_s),
    }
    for metric, values in (("ttft", ttft_s), ("tpot", tpot_s), ("e2e", e2e_s)):
        for stat, value in _percentiles(values).items():
            summary[f"{metric}_{stat}_ms"] = value
    summary.update({
        "goodput_rps": _ratio(good, duration_s),
        "goodput_fraction": _ratio(good, len(records)),
        "slo": slo,
        "gpu_hours": sum(p["gpu_hours"] for p in pool_out.values()),
        "cost_usd": sum(p["cost_usd"] for p in pool_out.values()),
        "cost_usd_per_1k_requests": _ratio(1000.0 * sum(p["cost_usd"] for p in pool_out.values()), len(completed)),
        "pools": pool_out,
        "kv_utilization_mean": _ratio(sum(i.kv_usage_time_integral for i in result.instances), instance_s),
        "busy_fraction": _ratio(sum(i.busy_s for i in result.instances), instance_s),
        "preemptions": preemptions,
        "prefix_cache_hit_rate": _ratio(sum(r.cached_prompt_tokens for r in dispatched), prompt_tokens),
        "wall_s": wall_s,
        "events": result.events,
        "sim_speed_x": _ratio(duration_s, wall_s),
        "requests_per_wall_s": _ratio(len(records), wall_s),
    })
    if result.migrations is not None:  # only when the policy document's `migration:` ran
        summary["migrations"] = dict(result.migrations)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few readable lines for a terminal."""

    def num(value: Any, digits: int = 1) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.{digits}f}"
        return f"{value:,}"

    lines = [
        f"policy {summary.get('policy') or '-'}: {num(summary['requests'])} requests, "
        f"{num(summary['completed'])} completed, {num(summary['rejected'])} rejected, "
        f"{num(summary['duration_s'])} s simulated in {num(summary['wall_s'], 2)} s wall",
        f"throughput {num(summary['throughput_rps'], 2)} req/s, {num(summary['output_tokens_per_s'], 0)} output tok/s; "
        f"goodput {num(summary['goodput_rps'], 2)} req/s ({num(_pct(summary['goodput_fraction']))}% met both SLOs)",
    ]
    for metric in ("ttft", "tpot", "e2e"):
        lines.append(
            f"{metric.upper():>4} ms  p50 {num(summary[f'{metric}_p50_ms'])}  p90 {num(summary[f'{metric}_p90_ms'])}  "
            f"p99 {num(summary[f'{metric}_p99_ms'])}  mean {num(summary[f'{metric}_mean_ms'])}")
    for name, entry in summary["slo"].items():
        lines.append(
            f"SLO {name}: {num(entry['requests'])} requests, TTFT met {num(_pct(entry['ttft_attainment']))}%, "
            f"TPOT met {num(_pct(entry['tpot_attainment']))}%, both {num(_pct(entry['both_attainment']))}%")
    for name, pool in summary["pools"].items():
        lines.append(
            f"pool {name}: {pool['instances']} x {pool['gpu']} ({pool['gpus']} GPUs), {num(pool['gpu_hours'], 2)} GPU-h, "
            f"${num(pool['cost_usd'], 2)}, busy {num(_pct(pool['busy_fraction']))}%, KV {num(_pct(pool['kv_utilization_mean']))}%")
    lines.append(
        f"total {num(summary['gpu_hours'], 2)} GPU-h, ${num(summary['cost_usd'], 2)}; "
        f"preemptions {num(summary['preemptions'])}; prefix-cache hit rate {num(_pct(summary['prefix_cache_hit_rate']))}%")
    moves = summary.get("migrations")
    if moves:
        lines.append(
            f"migrations {num(moves['started'])} started, {num(moves['committed'])} committed, "
            f"{num(moves['aborted'])} aborted; downtime p50 {num(moves['downtime_p50_ms'], 2)} ms, "
            f"p99 {num(moves['downtime_p99_ms'], 2)} ms; {num(moves['gib_copied'], 2)} GiB copied")
    return "\n".join(lines)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


# -- comparison table ----------------------------------------------------------------------

_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, summary key, format)
    ("requests", "requests", "d"),
    ("done", "completed", "d"),
    ("rej", "rejected", "d"),
    ("thr rps", "throughput_rps", ".2f"),
    ("TTFT p50 ms", "ttft_p50_ms", ".0f"),
    ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
    ("TPOT p50 ms", "tpot_p50_ms", ".1f"),
    ("TPOT p99 ms", "tpot_p99_ms", ".1f"),
    ("E2E p99 ms", "e2e_p99_ms", ".0f"),
    ("goodput rps", "goodput_rps", ".2f"),
    ("goodput %", "goodput_fraction", "%"),
    ("KV %", "kv_utilization_mean", "%"),
    ("preempt", "preemptions", "d"),
    ("cost $", "cost_usd", ".2f"),
)


def comparison_table(summaries_by_label: Mapping[str, Mapping[str, Any]]) -> str:
    """One aligned text row per run: the label, then the headline figures."""
    headers = ["run", *(header for header, _, _ in _TABLE_COLUMNS)]
    rows = []
    for label, summary in summaries_by_label.items():
        row = [str(label)]
        for _, key, fmt in _TABLE_COLUMNS:
            value = summary.get(key)
            if value is None:
                row.append("-")
            elif fmt == "%":
                row.append(f"{100.0 * value:.1f}")
            elif fmt == "d":
                row.append(f"{int(value)}")
            else:
                row.append(format(value, fmt))
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


# -- per-request records -------------------------------------------------------------------


def _record_rows(result: SimResult, slo_classes: Mapping[str, SloClass] | None) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in (*_RECORD_FIELDS, *_DERIVED_FIELDS)}
    for record in result.records:
        ttft_slo_s, tpot_slo_s = _slo_targets(record, slo_classes)
        for name in _RECORD_FIELDS:
            value = getattr(record, name)
            if name == "ttft_slo_s":
                value = _finite(ttft_slo_s)
            elif name == "tpot_slo_s":
                value = _finite(tpot_slo_s)
            columns[name].append(value)
        ttft, tpot, e2e = record.ttft_s, record.tpot_s, record.e2e_s
        columns["ttft_ms"].append(None if ttft is None else ttft * 1000.0)
        columns["tpot_ms"].append(None if tpot is None else tpot * 1000.0)
        columns["e2e_ms"].append(None if e2e is None else e2e * 1000.0)
        ttft_met, tpot_met = record_outcome(record, slo_classes)
        columns["ttft_met"].append(ttft_met)
        columns["tpot_met"].append(tpot_met)
        columns["goodput"].append(ttft_met and tpot_met)
    return columns


def write_records(result: SimResult, path: str | Path,
                  slo_classes: Mapping[str, SloClass] | None = None) -> Path:
    """Per-request records to Parquet (`.parquet`, via pyarrow) or CSV (`.csv`), with the
    derived latencies (ms) and SLO outcomes computed exactly as `summarize` does."""
    import pyarrow as pa

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"{path}: records file must end in .parquet or .csv, got {suffix or 'no extension'!r}")
    columns = _record_rows(result, slo_classes)
    types = {
        "arrival_s": pa.float64(), "dispatch_s": pa.float64(), "first_token_s": pa.float64(),
        "finish_s": pa.float64(), "ttft_slo_s": pa.float64(), "tpot_slo_s": pa.float64(),
        "ttft_ms": pa.float64(), "tpot_ms": pa.float64(), "e2e_ms": pa.float64(),
        "input_tokens": pa.int64(), "output_tokens": pa.int64(), "cached_prompt_tokens": pa.int64(),
        "preemptions": pa.int64(), "rejected": pa.bool_(), "ttft_met": pa.bool_(),
        "tpot_met": pa.bool_(), "goodput": pa.bool_(),
    }
    table = pa.table({name: pa.array(values, type=types.get(name, pa.string()))
                      for name, values in columns.items()})
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
    return path


# -- plots ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_latency_cdfs(results_by_label: Mapping[str, SimResult], path: str | Path) -> Path:
    """TTFT, TPOT and E2E CDFs (log-scale ms), one line per run."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, result in results_by_label.items():
        done = [r for r in result.records if not r.rejected and r.finish_s is not None]
        series = {
            "TTFT": [r.ttft_s for r in result.records if not r.rejected and r.ttft_s is not None],
            "TPOT": [r.tpot_s for r in done if r.output_tokens > 1 and r.tpot_s is not None],
            "E2E": [r.e2e_s for r in done if r.e2e_s is not None],
        }
        for ax, values in zip(axes, series.values(), strict=True):
            if not values:
                continue
            ms = np.sort(np.maximum(np.asarray(values, dtype=np.float64) * 1000.0, 1e-3))
            ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=str(label), linewidth=1.4)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, name in zip(axes, ("TTFT", "TPOT", "E2E"), strict=True):
        ax.set_xscale("log")
        # plain numbers on decades only: minor labels on a short log range overlap
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{name} CDF")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_load_over_time(result: SimResult, path: str | Path) -> Path:
    """Running and waiting requests and mean KV usage per pool over simulated time."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    by_pool: dict[str, list[Any]] = {}
    for sample in result.timeline:
        by_pool.setdefault(sample.pool, []).append(sample)
    for pool, samples in sorted(by_pool.items()):
        samples.sort(key=lambda s: s.t_s)
        t = [s.t_s for s in samples]
        axes[0].plot(t, [s.running for s in samples], label=pool, linewidth=1.2)
        axes[1].plot(t, [s.waiting for s in samples], label=pool, linewidth=1.2)
        axes[2].plot(t, [100.0 * s.kv_usage for s in samples], label=pool, linewidth=1.2)
    axes[0].set_ylabel("running requests")
    axes[1].set_ylabel("waiting requests")
    axes[2].set_ylabel("KV usage (%)")
    axes[2].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if by_pool:
        axes[0].legend(loc="upper right", fontsize=8)
    else:
        axes[0].set_title("no timeline samples recorded")
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Goodput and TTFT/E2E p99 against the arrival-rate scale, one line per series.

    `points`: dicts with `series` (e.g. the fleet size), `rate_scale` and `summary`.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        series.setdefault(str(point["series"]), []).append(point)
    for label, items in series.items():
        items = sorted(items, key=lambda p: float(p["rate_scale"]))
        x = [float(p["rate_scale"]) for p in items]
        for ax, key in zip(axes, ("goodput_rps", "ttft_p99_ms", "e2e_p99_ms"), strict=True):
            y = [p["summary"].get(key) for p in items]
            ax.plot(x, [math.nan if v is None else v for v in y], marker="o", label=label)
    titles = ("goodput (req/s meeting both SLOs)", "TTFT p99 (ms)", "E2E p99 (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("arrival rate scale (x trace rate)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
