"""The router's Prometheus metrics, on a registry of its own (several routers may share a process).

Label children are cached per (tenant, model, code) so a request costs a few dict hits,
not a `labels()` call per metric. The metrics every request updates (requests, attempts,
first byte, decide time, in flight, per-plugin time) are loop-local
(tokenyard/loop_metrics.py: no lock per update); the rest are prometheus_client's own.
All are on the one registry and in the one exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from tokenyard.loop_metrics import LoopCounter, LoopGauge, LoopHistogram, LoopMetrics

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DECIDE_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        hot = LoopMetrics()  # updated on every request: loop-local, no lock per update
        self.requests = hot.add(LoopCounter("tokenyard_router_requests",
                                            "Requests answered, by tenant, model and HTTP status",
                                            ["tenant", "model", "code"]))
        self.first_byte = hot.add(LoopHistogram("tokenyard_router_first_byte_seconds",
                                                "Time from request arrival to the first response byte relayed",
                                                ["tenant", "model"], buckets=LATENCY_BUCKETS_S))
        self.attempts = hot.add(LoopCounter("tokenyard_router_upstream_attempts",
                                            "Attempts to engines, by instance and outcome", ["instance", "outcome"]))
        self.retries = Counter("tokenyard_router_retries", "Retries on another instance, by tenant", ["tenant"],
                               registry=r)
        self.retry_budget_exhausted = Counter("tokenyard_router_retry_budget_exhausted",
                                              "Retries refused by the tenant's retry budget", ["tenant"], registry=r)
        self.midstream_errors = Counter("tokenyard_router_midstream_errors",
                                        "Streams ended with an error event after the first byte", ["instance"],
                                        registry=r)
        self.decide_seconds = hot.add(LoopHistogram("tokenyard_router_decide_seconds", "Dispatch decision time",
                                                    buckets=DECIDE_BUCKETS_S))
        self.inflight = hot.add(LoopGauge("tokenyard_router_inflight", "Requests in flight through this router"))
        self.instance_healthy = Gauge("tokenyard_router_instance_healthy", "1 if the instance takes traffic",
                                      ["instance"], registry=r)
        self.circuit_state = Gauge("tokenyard_router_circuit_state", "0 closed, 1 half-open, 2 open",
                                   ["instance"], registry=r)
        self.scrape_errors = Counter("tokenyard_router_scrape_errors", "Failed load scrapes of engine /metrics",
                                     ["instance"], registry=r)
        # Admission queue (flow control) and per-plugin decision latency (scheduler/).
        self.queue_length = Gauge("tokenyard_router_queue_length", "Requests held in the admission queue, by SLO class",
                                  ["slo_class"], registry=r)
        self.queue_wait = Histogram("tokenyard_router_queue_wait_seconds",
                                    "Time requests waited in the admission queue, by SLO class and outcome",
                                    ["slo_class", "outcome"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.plugin_seconds = hot.add(LoopHistogram("tokenyard_router_plugin_seconds",
                                                    "Time of each dispatch part (filter, scorer, picker) per sampled "
                                                    "decision (1 in `metrics.plugin_sample_every`)",
                                                    ["kind", "name"], buckets=DECIDE_BUCKETS_S))
        # Live migrations the router's loop ordered (router/migration_loop.py), by reason
        # (load, drain) and outcome (started, committed, aborted).
        self.migrations = Counter("tokenyard_router_migrations", "Live migrations by reason and outcome",
                                  ["reason", "outcome"], registry=r)
        self.tier_choices = Counter("tokenyard_router_tier_choices",
                                    "Requests for the tier alias, by the tier and model chosen", ["tier", "model"],
                                    registry=r)
        hot.register(r)
        self._instance_inflight: _InstanceInflight | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase | LoopCounter | LoopHistogram, *labels: str) -> Any:
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request_done(self, tenant: str, model: str, code: int) -> None:
        self.child(self.requests, tenant, model, str(code)).value += 1

    def tier_chosen(self, tier: str, model: str) -> None:
        self.child(self.tier_choices, tier, model).inc()

    def expose_instance_inflight(self, read: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """`tokenyard_router_instance_inflight{instance}`: the in-flight count dispatch reads
        per instance (every worker's requests under `--workers N`), from `read()` at each scrape."""
        if self._instance_inflight is None:
            self._instance_inflight = _InstanceInflight(read)
            self.registry.register(self._instance_inflight)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceInflight(Collector):
    def __init__(self, read: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tokenyard_router_instance_inflight",
                                   "Requests in flight to the instance as dispatch counts them (through every "
                                   "worker of `tokenyard router --workers N`)", labels=["instance"])
        for instance_id, count in self._read():
            family.add_metric([instance_id], count)
        yield family
