"""`tokenyard policy apply --dry-run=server`: what a tenant policy change would do,
predicted by the simulator on the router's recent traffic (or on `--trace FILE`).

Without `--trace`, the CLI asks the router for its request records of the last `--window`
(default 1h; the Admin `RecentRecords` call, router/records_admin.py) and replays them:
each record becomes one simulated arrival at its own time (relative to the first), with
its input and output tokens, tenant, SLO class and model; a request the router turned away
is replayed with its `max_tokens` as output length (its real one is unknown), or left out
without one. A router that keeps no records is an error that says how to turn them on.

The same requests run twice on the same cluster: as the cluster's policy document has
them (the baseline), and with the tenant's requests given the new policy's SLO class and
its dispatch profile pinned in `selection.by_tenant` (the candidate). When no request
belongs to the tenant, every request is taken as the tenant's (the question is then "this
policy for all of this traffic"), and the output says so. Models and SLO classes the
simulated cluster lacks become its default ones (said too). The per-tenant priority and
rate limits are not simulated (the simulator takes priority from the SLO class); the
output says that too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CLUSTER = Path(__file__).resolve().parents[1] / "sim" / "examples" / "small.yaml"


def _attainment(summary: dict[str, Any], slo_class: str | None) -> float | None:
    slo = summary.get("slo", {})
    entries = [slo[slo_class]] if slo_class is not None and slo_class in slo else list(slo.values())
    requests = sum(e["requests"] for e in entries)
    met = sum(e["both_attainment"] * e["requests"] for e in entries if e["both_attainment"] is not None)
    return met / requests if requests else None


def replay_policy_change(trace_path: str, name: str, spec: dict[str, Any] | None, cluster_path: str | None,
                         limit: int) -> dict[str, Any]:
    """Replay a trace file; see `replay_requests`."""
    from cli.admin_errors import EXIT_INVALID, CliError
    from sim.cli import TraceOptions

    try:
        requests = list(TraceOptions(trace_path, limit=max(1, limit)).open())
    except (OSError, ValueError) as exc:
        raise CliError(EXIT_INVALID, f"--dry-run=server: {exc}") from None
    if not requests:
        raise CliError(EXIT_INVALID, f"--trace {trace_path}: no requests to replay")
    return replay_requests(requests, trace_path, name, spec, cluster_path)


async def fetch_recent_records(client: Any, window_s: float, max_records: int) -> tuple[list[dict[str, Any]], bool, str]:
    """(records, truncated, source) of the router's last `window_s` (Admin RecentRecords)."""
    import grpc

    from cli.admin_errors import EXIT_INVALID, CliError, rpc_exit_code
    from tokenyard.v1 import admin_pb2

    rows: list[dict[str, Any]] = []
    truncated, source = False, ""
    request = admin_pb2.RecentRecordsRequest(window_s=window_s, max_records=max(1, min(max_records, 200_000)))
    try:
        async for chunk in client.stub.RecentRecords(request, timeout=max(client.timeout_s, 60.0)):
            rows.extend(json.loads(line) for line in chunk.records_json)
            truncated, source = truncated or chunk.truncated, chunk.source or source
    except grpc.aio.AioRpcError as exc:
        detail = exc.details() or exc.code().name
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise CliError(EXIT_INVALID, f"--dry-run=server: {detail}") from None
        raise CliError(rpc_exit_code(exc.code()), f"--dry-run=server: RecentRecords: {detail}") from None
    except ValueError as exc:
        raise CliError(EXIT_INVALID, f"--dry-run=server: the router sent a record that is not JSON: {exc}") from None
    if not rows:
        raise CliError(EXIT_INVALID, "--dry-run=server: the router recorded no requests in that window: nothing to "
                                     "replay (widen --window, or pass --trace FILE)")
    return rows, truncated, source


def records_requests(rows: Sequence[dict[str, Any]]) -> tuple[list[Any], int]:
    """Router request records -> simulated arrivals in arrival order, and how many were left
    out (no lengths: turned away without a `max_tokens`, or not a record)."""
    from sim.workload import TraceRequest

    found: list[tuple[float, dict[str, Any], int]] = []
    left_out = 0
    for row in rows:
        arrival, prompt = row.get("arrival_s"), row.get("input_tokens")
        output = row.get("output_tokens") or 0
        if not output and row.get("rejected"):
            output = row.get("max_tokens") or 0
        if not isinstance(arrival, (int, float)) or not isinstance(prompt, int) or not isinstance(output, int) \
                or prompt < 1 or output < 1:
            left_out += 1
            continue
        found.append((float(arrival), row, output))
    found.sort(key=lambda item: item[0])
    start = found[0][0] if found else 0.0
    requests = [TraceRequest(request_id=str(row.get("request_id") or f"rec-{i}"), arrival_s=arrival - start,
                             input_tokens=int(row["input_tokens"]), output_tokens=output,
                             tenant=str(row.get("tenant") or "default"),
                             slo_class=str(row.get("slo_class") or "default"), model=row.get("model") or None)
                for i, (arrival, row, output) in enumerate(found)]
    return requests, left_out


def replay_records(rows: Sequence[dict[str, Any]], label: str, name: str, spec: dict[str, Any] | None,
                   cluster_path: str | None, *, truncated: bool = False) -> dict[str, Any]:
    from cli.admin_errors import EXIT_INVALID, CliError

    requests, left_out = records_requests(rows)
    if not requests:
        raise CliError(EXIT_INVALID, f"--dry-run=server: none of the {len(rows)} records has lengths to replay")
    notes = []
    if left_out:
        notes.append(f"{left_out} record(s) without lengths left out")
    if truncated:
        notes.append("the router cut the window to its newest records (--sim-requests)")
    return replay_requests(requests, label, name, spec, cluster_path, notes)


def replay_requests(requests: list[Any], label: str, name: str, spec: dict[str, Any] | None,
                    cluster_path: str | None, notes: list[str] | None = None) -> dict[str, Any]:
    """Simulate baseline and candidate; print and return both summaries' key figures."""
    from tqdm import tqdm

    from cli.admin_errors import EXIT_INVALID, CliError
    from scheduler.policy_document import load_policy_document
    from sim.cluster import load_cluster
    from sim.report import summarize
    from sim.simulator import simulate

    try:
        cluster = load_cluster(cluster_path or DEFAULT_CLUSTER)
    except (OSError, ValueError) as exc:
        raise CliError(EXIT_INVALID, f"--dry-run=server: {exc}") from None
    spec = spec or {}
    raw = cluster.document().to_dict()
    notes = [*(notes or []), "priority and rate limits are not simulated"]
    requests = _fit_to_cluster(requests, cluster, raw, notes)
    profile = spec.get("profile")
    if profile is not None and profile in raw["profiles"]:
        raw["selection"]["by_tenant"][name] = profile
    elif profile is not None:
        notes.append(f"profile {profile!r} is not in the cluster's policy document; its selection is used")
    slo_class = spec.get("slo_class", "default")
    if slo_class not in raw["slo_classes"]:
        raise CliError(EXIT_INVALID, f"--cluster: the simulated cluster has no SLO class {slo_class!r}")
    ours = [r for r in requests if r.tenant == name]
    if not ours:
        notes.append(f"the traffic has no requests of tenant {name!r}: every request is taken as theirs")
        requests = [dataclasses.replace(r, tenant=name) for r in requests]
    candidate_requests = [dataclasses.replace(r, slo_class=slo_class) if r.tenant == name else r for r in requests]
    candidate = dataclasses.replace(cluster, policy=load_policy_document(raw))
    figures: dict[str, Any] = {}
    runs = (("current", cluster, requests, None), ("new", candidate, candidate_requests, None))
    for run_label, spec_cluster, reqs, cls in tqdm(runs, desc="simulating", unit="run", leave=False):
        summary = summarize(simulate(spec_cluster, iter(reqs), seed=0), dict(spec_cluster.slo_classes))
        figures[run_label] = {"slo_attainment": _attainment(summary, cls),
                              "goodput_fraction": summary["goodput_fraction"],
                              "cost_usd": summary["cost_usd"], "gpu_hours": summary["gpu_hours"]}
    cur, new = figures["current"], figures["new"]
    print(f"simulated {len(requests)} requests of {label} on {cluster.source}:")
    for key in ("slo_attainment", "goodput_fraction", "cost_usd"):
        a, b = cur[key], new[key]
        change = f"{b - a:+.4f}" if a is not None and b is not None else "n/a"
        print(f"  {key:<17} current {_fmt(a)}  new {_fmt(b)}  change {change}")
    print("  note: " + "; ".join(notes))
    figures["requests"] = len(requests)
    return figures


def _fit_to_cluster(requests: list[Any], cluster: Any, raw: dict[str, Any], notes: list[str]) -> list[Any]:
    """Models and SLO classes the simulated cluster lacks become its default ones (noted)."""
    served = {pool.model.name.lower() for pool in cluster.pools}
    classes = set(raw["slo_classes"])
    models_moved = classes_moved = 0
    out = []
    for request in requests:
        changes: dict[str, Any] = {}
        if request.model is not None and request.model.lower() not in served:
            changes["model"] = None
            models_moved += 1
        if request.slo_class not in classes:
            changes["slo_class"] = "default" if "default" in classes else sorted(classes)[0]
            classes_moved += 1
        out.append(dataclasses.replace(request, **changes) if changes else request)
    if models_moved:
        notes.append(f"{models_moved} request(s) for models the cluster does not serve replayed on its default "
                     f"model {cluster.default_model}")
    if classes_moved:
        notes.append(f"{classes_moved} request(s) of SLO classes the cluster lacks replayed as its default class")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
