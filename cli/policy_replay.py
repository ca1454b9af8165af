"""`tokenyard policy apply --dry-run=server --trace FILE`: what a tenant policy change would
do, predicted by the simulator on a trace.

The router keeps no request records yet, so "the last hour of traffic" is a trace file the
operator passes. The same requests run twice on the same cluster: as the cluster's policy
document has them (the baseline), and with the tenant's requests given the new policy's
SLO class and its dispatch profile pinned in `selection.by_tenant` (the candidate). When
no request of the trace belongs to the tenant, every request is taken as the tenant's
(the question is then "this policy for all of this traffic"), and the output says so.
The per-tenant priority and rate limits are not simulated (the simulator takes priority
from the SLO class); the output says that too.
"""

from __future__ import annotations

import dataclasses
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
    """Simulate baseline and candidate; print and return both summaries' key figures."""
    from tqdm import tqdm

    from cli.admin import EXIT_INVALID, CliError
    from scheduler.policy_document import load_policy_document
    from sim.cli import TraceOptions
    from sim.cluster import load_cluster
    from sim.report import summarize
    from sim.simulator import simulate

    try:
        cluster = load_cluster(cluster_path or DEFAULT_CLUSTER)
        requests = list(TraceOptions(trace_path, limit=max(1, limit)).open())
    except (OSError, ValueError) as exc:
        raise CliError(EXIT_INVALID, f"--dry-run=server: {exc}") from None
    if not requests:
        raise CliError(EXIT_INVALID, f"--trace {trace_path}: no requests to replay")
    spec = spec or {}
    raw = cluster.document().to_dict()
    notes = ["priority and rate limits are not simulated"]
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
        notes.append(f"the trace has no requests of tenant {name!r}: every request is taken as theirs")
        requests = [dataclasses.replace(r, tenant=name) for r in requests]
    candidate_requests = [dataclasses.replace(r, slo_class=slo_class) if r.tenant == name else r for r in requests]
    candidate = dataclasses.replace(cluster, policy=load_policy_document(raw))
    figures: dict[str, Any] = {}
    runs = (("current", cluster, requests, None), ("new", candidate, candidate_requests, None))
    for label, spec_cluster, reqs, cls in tqdm(runs, desc="simulating", unit="run", leave=False):
        summary = summarize(simulate(spec_cluster, iter(reqs), seed=0), dict(spec_cluster.slo_classes))
        figures[label] = {"slo_attainment": _attainment(summary, cls), "goodput_fraction": summary["goodput_fraction"],
                          "cost_usd": summary["cost_usd"], "gpu_hours": summary["gpu_hours"]}
    cur, new = figures["current"], figures["new"]
    print(f"simulated {len(requests)} requests of {trace_path} on {cluster.source}:")
    for key in ("slo_attainment", "goodput_fraction", "cost_usd"):
        a, b = cur[key], new[key]
        change = f"{b - a:+.4f}" if a is not None and b is not None else "n/a"
        print(f"  {key:<17} current {_fmt(a)}  new {_fmt(b)}  change {change}")
    print("  note: " + "; ".join(notes))
    return figures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
