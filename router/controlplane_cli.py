"""`tokenyard controlplane --config FILE`: run the control loop (router/controlplane.py)
with leader election, its Prometheus metrics, until SIGINT/SIGTERM.

With `actuator: kubernetes` the official client talks to the API server (in-cluster
config, else kubeconfig, or `kubernetes.api_url`), the pools' Deployments come from
`pools[].deployment` or the chart's TOKENYARD_SCALABLE_DEPLOYMENTS, and the replicas elect
a leader through the Lease the chart names (TOKENYARD_LEASE_NAME, POD_NAME, ...:
`LeaderElectionSettings.from_env`). With `actuator: print` (no cluster) it runs alone and
prints each step and its command. `--once` runs one round and exits (a dry look at what it
would do). Metrics bind loopback unless `metrics.host` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "controlplane",
        help="run the control plane: re-plan pool sizes from the live workload, drain, then scale",
        description="Leader-elected control loop: reads the workload histogram the routers record in the state "
                    "store, re-solves the pool plan, decides targets with hysteresis and dwell, drains instances "
                    "before scaling a pool down (Kubernetes scale subresource, or printed commands).",
    )
    parser.add_argument("--config", required=True, help="control-plane YAML (see docs/planner.md)")
    parser.add_argument("--once", action="store_true", help="one control round, then exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="change nothing: drains are only logged, Kubernetes scale changes go with dryRun=All "
                             "(validated, not stored)")
    parser.set_defaults(handler=run_command)


@dataclass
class ControlPlaneMetrics:
    registry: Any = None
    leader: Any = field(init=False)
    target_replicas: Any = field(init=False)
    replicas: Any = field(init=False)
    load_instances: Any = field(init=False)
    draining: Any = field(init=False)
    scale_actions: Any = field(init=False)
    plan_usd_per_hour: Any = field(init=False)
    ticks: Any = field(init=False)
    tick_errors: Any = field(init=False)
    solve_errors: Any = field(init=False)
    plan_decisions: Any = field(init=False)

    def __post_init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = self.registry or CollectorRegistry()
        p = "tokenyard_controlplane_"
        self.leader = Gauge(p + "leader", "1 while this replica holds the Lease and acts", registry=r)
        self.target_replicas = Gauge(p + "target_replicas", "Decided replicas per pool", ["pool"], registry=r)
        self.replicas = Gauge(p + "replicas", "Replicas per pool as the platform reports", ["pool"], registry=r)
        self.load_instances = Gauge(p + "load_instances", "Observed load per pool, in instance-equivalents",
                                    ["pool"], registry=r)
        self.draining = Gauge(p + "draining_instances", "Instances this control plane is draining", ["pool"],
                              registry=r)
        self.scale_actions = Counter(p + "actions", "Actions taken (target, drain, undrain, scale_up, scale_down, routing)",
                                     ["pool", "action"], registry=r)
        self.plan_usd_per_hour = Gauge(p + "plan_usd_per_hour", "Cost of the last solved pool plan", registry=r)
        self.ticks = Counter(p + "ticks", "Control rounds completed while leading", registry=r)
        self.tick_errors = Counter(p + "tick_errors", "Control rounds that failed", registry=r)
        self.solve_errors = Counter(p + "solve_errors", "Plan re-solves that failed", registry=r)
        self.plan_decisions = Counter(p + "plan_decisions", "Re-solves by decision (first, same_pools, steady, kept, held: the "
                                      "pool set stays; uncovered, cheaper, dropped: it changes)", ["decision"],
                                      registry=r)


def kube_api_client(api_url: str | None) -> Any:
    from kubernetes import client, config

    if api_url:
        return client.ApiClient(client.Configuration(host=api_url))
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def leading_fn(elector: Any) -> Any:
    """Act only while the Lease is ours and was renewed within the renew deadline, so a
    leader cut off from the API server stops acting before anyone else may take over."""
    def leading() -> bool:
        renewed = elector.last_renewed_s
        return bool(elector.is_leader and renewed is not None
                    and elector.clock() - renewed < elector.settings.renew_deadline_s)
    return leading


async def build(config: Any, store: Any, *, api_client: Any = None, election: Any = None,
                dry_run: bool = False, env: Mapping[str, str] | None = None,
                metrics: ControlPlaneMetrics | None = None) -> tuple[Any, Any]:
    """(ControlPlane, LeaseElector or None) wired from `config`; `election` overrides the
    settings the environment gives (tests)."""
    from router.controlplane import ControlPlane, KubernetesActuator, PrintActuator

    env = os.environ if env is None else env
    if config.actuator == "kubernetes":
        from kubernetes import client

        from router.k8s_scale import ScaleActuator, ScaleLimits, parse_deployments
        from router.leader import LeaderElectionSettings, LeaseElector

        api_client = api_client or kube_api_client(config.kube_api_url)
        deployments = parse_deployments(env.get("TOKENYARD_SCALABLE_DEPLOYMENTS", ""))
        deployments = {p.name: p.deployment or deployments[p.name] for p in config.pools}
        limits = ScaleLimits(max_step=config.autoscaler.max_step, min_interval_s=config.kube_min_interval_s,
                             max_replicas=max(p.max_replicas for p in config.pools))
        scale = ScaleActuator(client.AppsV1Api(api_client), config.namespace, deployments, limits=limits,
                              dry_run=dry_run or config.kube_dry_run)
        actuator: Any = KubernetesActuator(scale, client.CoreV1Api(api_client))
        elector = None
        if config.leader_election:
            settings = election or LeaderElectionSettings.from_env(env)
            elector = LeaseElector(settings, client.CoordinationV1Api(api_client))
        leading = leading_fn(elector) if elector is not None else (lambda: True)
        plane = ControlPlane(config, store, actuator, leading=leading, metrics=metrics, dry_run=dry_run,
                             identity=elector.settings.identity if elector is not None else "")
        return plane, elector
    counts: dict[str, int] = {}
    for record in await store.list_instances():
        if not record.draining:
            counts[record.pool] = counts.get(record.pool, 0) + 1
    actuator = PrintActuator({p.name: counts.get(p.name, 0) for p in config.pools})
    return ControlPlane(config, store, actuator, metrics=metrics, dry_run=dry_run), None


async def serve(config: Any, store: Any, stop: asyncio.Event, *, once: bool = False, **kw: Any) -> Any:
    """Build, then run the election and the loop until `stop` (or one round with `once`)."""
    plane, elector = await build(config, store, **kw)
    if once:
        try:
            if elector is not None:
                await asyncio.to_thread(elector.step)
                if not elector.is_leader:
                    print(f"not leading: {elector.observed_holder} holds the Lease; nothing done")
            await plane.tick()
        finally:
            plane.close()
            if elector is not None and elector.is_leader:
                await asyncio.to_thread(elector.release)  # a one-off round must not hold the Lease
        return plane
    await run_plane(plane, elector, stop)
    return plane


async def run_plane(plane: Any, elector: Any, stop: asyncio.Event) -> None:
    """The election (if any) and the control loop side by side until `stop`."""
    metrics = plane.metrics
    tasks: list[asyncio.Task[Any]] = []
    try:
        if elector is not None:
            async def started() -> None:
                log.info("leading: the control loop acts", extra={"identity": elector.settings.identity})
                if metrics is not None:
                    metrics.leader.set(1)

            async def stopped() -> None:
                log.warning("not leading: the control loop stands by", extra={"identity": elector.settings.identity})
                if metrics is not None:
                    metrics.leader.set(0)

            tasks.append(asyncio.create_task(elector.run(started, stopped, stop), name="lease-elector"))
        elif metrics is not None:
            metrics.leader.set(1)
        await plane.run(stop)
    finally:
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5.0)  # the elector releases the Lease on its way out
        plane.close()


async def serve_metrics(host: str, port: int, registry: Any, limits: Any = None) -> Any:
    """`GET /metrics` of `registry` on Tokenyard's one HTTP server (tokenyard/asgi_server.py),
    bounded like the front door: prometheus_client's own server (a thread per connection,
    no read timeout) held a thread for every connection that sent half a request head, for
    as long as it stayed open (100 such connections: 100 threads, still there 15 s later;
    tests/test_security_http.py). Returns the started `Http1Server` (its `port` is bound)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from tokenyard.asgi_server import Http1Limits, Http1Server

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] in ("/metrics", "/"):
            status, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST.encode()
        else:
            status, body, kind = 404, b"not found: GET /metrics\n", b"text/plain"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    # A scrape is a GET: no body, few connections (Prometheus replicas, an operator's curl).
    server = Http1Server(app, host, port, limits=limits or Http1Limits(max_body_bytes=0, max_connections=64),
                         name="control-plane metrics")
    await server.start()
    return server


def run_command(args: argparse.Namespace) -> int:
    from router.controlplane import load_config
    from router.state import StateStoreError, open_store
    from tokenyard.config import ConfigError

    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"tokenyard controlplane: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            store = open_store(config.store_url)
            if hasattr(store, "ping"):
                await store.ping()
        except (StateStoreError, OSError) as exc:
            print(f"tokenyard controlplane: store {config.store_url}: {exc}", file=sys.stderr)
            return 2
        metrics = ControlPlaneMetrics()
        metrics_server = None
        if config.metrics_port is not None and not args.once:
            try:
                metrics_server = await serve_metrics(config.metrics_host, config.metrics_port, metrics.registry)
            except OSError as exc:
                await store.close()
                print(f"tokenyard controlplane: metrics: {exc}", file=sys.stderr)
                return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        started_s = time.monotonic()
        try:
            plane = await serve(config, store, stop, once=args.once, dry_run=args.dry_run, metrics=metrics)
        finally:
            await store.close()
            if metrics_server is not None:
                await metrics_server.stop(1.0)
        if args.once:
            for _t_s, pool, action, detail in plane.actions:
                print(f"{pool}: {action} {detail}")
            targets = {name: state.target for name, state in plane.pools.items()}
            print(f"targets: {targets} ({time.monotonic() - started_s:.1f} s)")
        return 0

    return asyncio.run(main())
