"""The control plane's live loop: plan the fleet from the observed workload and resize it.

`tokenyard controlplane --config FILE` (router/controlplane_cli.py) runs one
`ControlPlane`. Of several replicas only the holder of a Kubernetes Lease acts
(`router.leader.LeaseElector`); the others only follow the election. The leader, every
`autoscaler.interval_s`:

1. reads every router replica's workload histogram from the state store and merges them
   (`router.workload_recorder.read_workload`), summed over the configured models and SLO
   classes into the length-bucket grid of `input_edges` x `output_edges` (coarser than
   the routers' buckets is fine: every inner edge must be one of theirs);
2. every `resolve_interval_s` (and at the first tick) re-solves the pool plan from those
   rates (`scheduler.planner.solver.solve`: which share of each bucket goes to which pool)
   and switches to it or stays on the current plan's pools
   (`scheduler.planner.autoscale.keep_or_switch`: a plan on other pools must be cheaper by
   `autoscaler.switch_margin` than the best plan on the current ones, and none comes
   within `autoscaler.switch_dwell_s` of the last pool-set change, unless those cannot
   carry the load; `PoolSetSwitch.resolve`, with each pool's `min_replicas` as a floor
   the solve counts, priced and routed to, since the loop keeps it anyway, and each pool
   priced at the loop's `scale_down_headroom`); a solve that
   fails keeps the previous plan (logged, rate-limited); a
   newly chosen plan's routing table goes to the store (`router.plan_routing`), where every router's `length_bucket`
   filter picks it up, so dispatch follows the resized fleet. With `route_by: predicted`
   the solve is on routing keys (input row x the routers' ranker's predicted output
   column, its quality from `rank_tau` or `rank_noise_sd`: scheduler.planner.predicted,
   as `tokenyard plan --route-by predicted`) and the table says `output_source:
   predicted_rank`, so routers follow the cell for every request their ranker scored,
   `max_tokens` or not;
3. turns the rates into each pool's load in instance-equivalents through the plan's shares
   and decides the targets with hysteresis, dwell and idle-to-minimum
   (`scheduler.planner.autoscale.decide_targets`);
4. moves each pool one step toward its target (`scheduler.planner.fleet.pool_step`):
   scale-ups at once; a scale-down first sets the draining flag of the instances to go
   (in the store, which every router follows), then reads each one's in-flight count from
   its engine (`vllm:num_requests_running + waiting`), and only once one is empty after
   the drain grace it lowers the replica count by the empty ones.

Actuators: `KubernetesActuator` (the Deployment's scale subresource through
`router.k8s_scale.ScaleActuator`, rate-limited, dry run) and `PrintActuator` (elsewhere:
prints the plan and the commands). A new leader adopts the fleet as it finds it and the
drains its predecessor recorded in the store (`controlplane:drains`), and waits one dwell
before scaling down, so a failover never resizes on a half-known history. Decisions are
the pure functions of scheduler/planner; this module does the I/O.

After every round the leader writes the latest plan and targets to the store
(router/plan_record.py, `controlplane:plan`): what `tokenyard plan show` reads through the
Admin service of any router on that store. A cordoned instance is not draining: it stays in
its pool's count and is never picked for a scale-down's drain by its cordon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.load import MAX_METRICS_BYTES, parse_vllm_metrics
from router.plan_record import PLAN_KEY, PLAN_TTL_S, plan_document
from router.plan_routing import publish_routing
from router.proxy import PoolSet, UpstreamError
from router.state import InstanceRecord, StateStore
from router.workload_recorder import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, read_workload
from scheduler.planner.autoscale import (
    AutoscalerConfig,
    PlanChoice,
    PoolObservation,
    PoolSetSwitch,
    decide_targets,
    pool_loads,
)
from scheduler.planner.fleet import LiveInstance, last_request_by_pool, pool_step
from scheduler.planner.histogram import LengthHistogram
from scheduler.planner.predicted import grid_noise_sd, grid_routing_keys
from scheduler.planner.problem import (
    Bucket,
    Plan,
    PlanError,
    PlanProblem,
    PoolOption,
    RoutingKey,
    bucket_of,
    grid_buckets,
)
from scheduler.planner.routing import table_from_plan
from tokenyard.config import ConfigError, check_keys, get, load_yaml
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)

MAX_POOLS = 64
DRAINS_KEY = "controlplane:drains"  # the leader's own drains, in the store, so a successor adopts them
DRAINS_TTL_S = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    gpu: str
    tp: int
    usd_per_hour: float  # one instance (all its GPUs)
    capacity_rps: tuple[float, ...]  # per bucket, row-major over (input row, output column)
    min_replicas: int = 0
    max_replicas: int = 64
    deployment: str | None = None


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    store_url: str
    pools: tuple[PoolConfig, ...]
    input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES
    output_edges: tuple[int, ...] = DEFAULT_OUTPUT_EDGES
    models: tuple[str, ...] = ()  # whose workload counts (empty: every model)
    headroom: float = 0.2  # the planner's; a re-solve prices pools at max(this, autoscaler.scale_down_headroom)
    resolve_interval_s: float = 300.0
    drain_grace_s: float = 10.0
    scrape_timeout_s: float = 2.0
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    actuator: str = "print"  # "kubernetes" | "print"
    namespace: str = "default"
    kube_dry_run: bool = False
    kube_min_interval_s: float = 0.0  # between two changes of one pool (the loop has its own dwell)
    kube_api_url: str | None = None  # None: in-cluster config, else kubeconfig
    leader_election: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400
    # "cell": each cell's split, looked up by a request's max_tokens; "predicted": plan on
    # the routers' ranker (routing keys, scheduler.planner.predicted) with this quality.
    route_by: str = "cell"
    rank_tau: float | None = None  # the ranker's Kendall tau; the noise is calibrated on the live grid
    rank_noise_sd: float | None = None  # or the noise on ln(1 + output tokens) itself (0: exact)


_TOP_KEYS = ("store", "pools", "input_edges", "output_edges", "models", "headroom", "resolve_interval_s",
             "drain_grace_s", "scrape_timeout_s", "autoscaler", "actuator", "kubernetes", "leader_election",
             "metrics", "route_by", "rank_tau", "rank_noise_sd")
_POOL_KEYS = ("name", "gpu", "tp", "usd_per_hour", "capacity_rps", "min_replicas", "max_replicas", "deployment")
_AUTOSCALER_KEYS = ("interval_s", "window_s", "headroom", "scale_down_headroom", "dwell_s", "idle_s", "max_step",
                    "switch_margin", "switch_dwell_s")


def _edges(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in raw):
        raise ConfigError(where, f"expected a list of at least 2 integer token edges, got {raw!r}")
    if any(b <= a for a, b in zip(raw, raw[1:], strict=False)) or raw[0] < 0:
        raise ConfigError(where, f"expected increasing edges from >= 0, got {raw!r}")
    return tuple(raw)


def _capacity(raw: Any, rows: int, cols: int, where: str) -> tuple[float, ...]:
    shape = f"{rows} rows (input buckets) of {cols} numbers (output buckets)"
    if not isinstance(raw, list) or len(raw) != rows:
        raise ConfigError(where, f"expected {shape}, got {raw!r}")
    out: list[float] = []
    for i, row in enumerate(raw):
        if not isinstance(row, list) or len(row) != cols or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and math.isfinite(v) for v in row):
            raise ConfigError(f"{where}[{i}]", f"expected {cols} req/s values >= 0, got {row!r}")
        out.extend(float(v) for v in row)
    return tuple(out)


def _pool(raw: Any, where: str, rows: int, cols: int) -> PoolConfig:
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}")
    check_keys(raw, _POOL_KEYS, where)
    pool = PoolConfig(
        name=get(raw, "name", str, where), gpu=get(raw, "gpu", str, where), tp=get(raw, "tp", int, where, 1, minimum=1),
        usd_per_hour=get(raw, "usd_per_hour", float, where, minimum=0),
        capacity_rps=_capacity(raw.get("capacity_rps"), rows, cols, f"{where}.capacity_rps"),
        min_replicas=get(raw, "min_replicas", int, where, 0, minimum=0),
        max_replicas=get(raw, "max_replicas", int, where, 64, minimum=0),
        deployment=get(raw, "deployment", str, where, None) if raw.get("deployment") is not None else None)
    if pool.min_replicas > pool.max_replicas:
        raise ConfigError(where, f"min_replicas {pool.min_replicas} > max_replicas {pool.max_replicas}")
    return pool


def _autoscaler(raw: Any, where: str, pools: Sequence[PoolConfig]) -> AutoscalerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {raw!r}")
    check_keys(raw, _AUTOSCALER_KEYS, where)
    base = AutoscalerConfig()
    values: dict[str, Any] = {k: get(raw, k, int if k == "max_step" else float, where, getattr(base, k))
                              for k in _AUTOSCALER_KEYS}
    config = AutoscalerConfig(**values, min_replicas={p.name: p.min_replicas for p in pools},
                              max_replicas={p.name: p.max_replicas for p in pools})
    try:
        config.validate()
    except PlanError as exc:
        raise ConfigError(where, str(exc).removeprefix("autoscaler: ")) from None
    return config


def parse_config(doc: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    """Validate a control-plane document; every error names `source: key.path`."""
    try:
        return _parse(doc, env or {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.where}", exc.problem) from None


def _parse(doc: Mapping[str, Any], env: Mapping[str, str]) -> ControlPlaneConfig:
    check_keys(doc, _TOP_KEYS, "")
    w = ""
    input_edges = _edges(doc.get("input_edges", list(DEFAULT_INPUT_EDGES)), "input_edges")
    output_edges = _edges(doc.get("output_edges", list(DEFAULT_OUTPUT_EDGES)), "output_edges")
    raw_pools = get(doc, "pools", list, w)
    if not raw_pools or len(raw_pools) > MAX_POOLS:
        raise ConfigError("pools", f"expected 1 to {MAX_POOLS} pools, got {len(raw_pools)}")
    pools = tuple(_pool(p, f"pools[{i}]", len(input_edges) - 1, len(output_edges) - 1)
                  for i, p in enumerate(raw_pools))
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ConfigError("pools", f"duplicate pool names in {names}")
    kube = get(doc, "kubernetes", dict, w, {})
    check_keys(kube, ("namespace", "dry_run", "min_interval_s", "api_url"), "kubernetes")
    metrics = get(doc, "metrics", dict, w, {})
    check_keys(metrics, ("host", "port"), "metrics")
    models = get(doc, "models", list, w, [])
    if not all(isinstance(m, str) and m for m in models):
        raise ConfigError("models", f"expected a list of model names, got {models!r}")
    config = ControlPlaneConfig(
        store_url=_store_url(doc, env), pools=pools, input_edges=input_edges, output_edges=output_edges,
        models=tuple(models), headroom=get(doc, "headroom", float, w, 0.2, minimum=0),
        resolve_interval_s=get(doc, "resolve_interval_s", float, w, 300.0, minimum=0.001),
        drain_grace_s=get(doc, "drain_grace_s", float, w, 10.0, minimum=0),
        scrape_timeout_s=get(doc, "scrape_timeout_s", float, w, 2.0, minimum=0.01),
        autoscaler=_autoscaler(doc.get("autoscaler", {}), "autoscaler", pools),
        actuator=get(doc, "actuator", str, w, "print", choices=("kubernetes", "print")),
        namespace=get(kube, "namespace", str, "kubernetes", env.get("POD_NAMESPACE", "default")),
        kube_dry_run=get(kube, "dry_run", bool, "kubernetes", False),
        kube_min_interval_s=get(kube, "min_interval_s", float, "kubernetes", 0.0, minimum=0),
        kube_api_url=get(kube, "api_url", str, "kubernetes", None) if kube.get("api_url") else None,
        leader_election=get(doc, "leader_election", bool, w, True),
        metrics_host=get(metrics, "host", str, "metrics", "127.0.0.1"),
        metrics_port=get(metrics, "port", int, "metrics", 9400, minimum=0) if metrics.get("port", 0) is not None
        else None)
    if not config.headroom < 1:
        raise ConfigError("headroom", f"expected a fraction in [0, 1), got {config.headroom}")
    if config.metrics_port is not None and config.metrics_port > 65535:
        raise ConfigError("metrics.port", f"expected a TCP port 0-65535 (null: no metrics server), "
                                          f"got {config.metrics_port}")
    config = _route_by(doc, config)
    if config.actuator == "kubernetes":
        from router.k8s_scale import parse_deployments

        from_env = parse_deployments(env.get("TOKENYARD_SCALABLE_DEPLOYMENTS", ""))
        missing = [p.name for p in pools if p.deployment is None and p.name not in from_env]
        if missing:
            raise ConfigError("pools", f"actuator kubernetes: no Deployment for pool(s) {', '.join(missing)}; "
                              "expected pools[].deployment or TOKENYARD_SCALABLE_DEPLOYMENTS=pool=deployment,...")
    return config


def _route_by(doc: Mapping[str, Any], config: ControlPlaneConfig) -> ControlPlaneConfig:
    route_by = get(doc, "route_by", str, "", "cell", choices=("cell", "predicted"))
    tau = get(doc, "rank_tau", float, "", None) if doc.get("rank_tau") is not None else None
    sd = get(doc, "rank_noise_sd", float, "", None, minimum=0) if doc.get("rank_noise_sd") is not None else None
    if route_by != "predicted":
        if tau is not None or sd is not None:
            raise ConfigError("rank_tau" if tau is not None else "rank_noise_sd", "only with route_by: predicted")
        return config
    if (tau is None) == (sd is None):
        raise ConfigError("route_by", "predicted: expected exactly one of rank_tau (the ranker's Kendall tau, "
                          "as `tokenyard train rank` reports it) or rank_noise_sd")
    if tau is not None and not 0 < tau <= 1:
        raise ConfigError("rank_tau", f"expected a Kendall tau in (0, 1], got {tau}")
    if sd is not None and not math.isfinite(sd):
        raise ConfigError("rank_noise_sd", f"expected a finite number >= 0, got {sd}")
    return dataclasses.replace(config, route_by=route_by, rank_tau=tau, rank_noise_sd=sd)


def _store_url(doc: Mapping[str, Any], env: Mapping[str, str]) -> str:
    # The chart passes the URL (it carries the Redis password) in the environment.
    if "store" in doc:
        return get(doc, "store", str, "")
    url = env.get("TOKENYARD_STORE_URL")
    if not url:
        raise ConfigError("store", "required key is missing (expected the routers' state store URL, e.g. "
                          "redis://host:6379/0, or TOKENYARD_STORE_URL in the environment)")
    return url


def load_config(path: str, env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    return parse_config(load_yaml(path), path, env)


def _coarsen(fine: Sequence[int], coarse: Sequence[int]) -> list[int] | None:
    """The coarse bucket of each fine bucket, when every inner coarse edge is a fine edge
    (each fine bucket then lies in exactly one coarse one); None otherwise."""
    if not set(coarse[1:-1]) <= set(fine):
        return None
    return [bucket_of(coarse, lo) for lo in fine[:-1]]


# -- actuators ------------------------------------------------------------------------------
class FleetActuator(Protocol):
    """What the live loop needs from a platform: read and set each pool's replica count.
    `removing` names the drained, empty instances a shrink must take away; `undrained`
    says an instance went back to work (it must no longer be the first to go)."""

    def current_replicas(self) -> dict[str, int]: ...

    def set_replicas(self, pool: str, replicas: int, removing: Sequence[InstanceRecord]) -> bool: ...

    def undrained(self, record: InstanceRecord) -> None: ...


class PrintActuator:
    """Outside Kubernetes: changes nothing, prints the step and the command that makes it."""

    def __init__(self, initial: Mapping[str, int], emit: Callable[[str], None] = print) -> None:
        self.replicas = dict(initial)
        self.emit = emit
        self.commands: list[str] = []

    def current_replicas(self) -> dict[str, int]:
        return dict(self.replicas)

    def set_replicas(self, pool: str, replicas: int, removing: Sequence[InstanceRecord]) -> bool:
        gone = ", ".join(r.instance_id for r in removing)
        command = f"# pool {pool}: {self.replicas.get(pool, 0)} -> {replicas} replica(s)" + \
            (f"; stop the drained, empty instance(s) {gone}" if gone else "; start instance(s)")
        self.commands.append(command)
        self.emit(command)
        self.replicas[pool] = replicas
        return True

    def undrained(self, record: InstanceRecord) -> None:
        return None


DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DRAINED_COST = "-1000000"  # lower goes first; the ReplicaSet reads it when it picks pods to delete


class KubernetesActuator:
    """Each pool's Deployment through the scale subresource (`ScaleActuator`). Before a
    shrink, the drained pods get the lowest `pod-deletion-cost`, so the ReplicaSet removes
    those and not a busy one (pods are named by the discovery's `namespace/pod` ids)."""

    def __init__(self, scale: Any, core_api: Any = None) -> None:
        self.scale = scale  # router.k8s_scale.ScaleActuator
        self.core = core_api  # kubernetes.client.CoreV1Api

    def current_replicas(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool, deployment in self.scale.deployments.items():
            read = self.scale.api.read_namespaced_deployment_scale(deployment, self.scale.namespace)
            out[pool] = int(read.spec.replicas or 0)
        return out

    def _cost(self, record: InstanceRecord, value: str | None) -> bool:
        namespace, _, pod = record.instance_id.partition("/")
        if record.source != "kubernetes" or not pod or self.core is None:
            return True  # not a pod we can name: nothing to mark
        try:
            self.core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": {DELETION_COST: value}}})
        except Exception as exc:
            log.warning("pod deletion cost not set", extra={"pod": record.instance_id, "error": str(exc)})
            return False
        return True

    def set_replicas(self, pool: str, replicas: int, removing: Sequence[InstanceRecord]) -> bool:
        if not all([self._cost(record, DRAINED_COST) for record in removing]):
            return False  # without the mark the ReplicaSet might pick a busy pod: wait
        result = self.scale.set_replicas({pool: replicas})[pool]
        if result.reason.startswith("error"):
            log.warning("scale failed", extra={"pool": pool, "replicas": replicas, "reason": result.reason})
        return bool(result.applied == replicas or (result.dry_run and result.applied is not None))

    def undrained(self, record: InstanceRecord) -> None:
        self._cost(record, None)


# -- the loop -------------------------------------------------------------------------------
@dataclass(slots=True)
class _PoolState:
    target: int = 0
    last_change_s: float = -math.inf
    drained_since_s: dict[str, float] = field(default_factory=dict)  # our drains: instance -> when


class ControlPlane:
    """One replica. `leading()` says whether it may act now (the elector's view)."""

    def __init__(self, config: ControlPlaneConfig, store: StateStore, actuator: FleetActuator, *,
                 leading: Callable[[], bool] = lambda: True, metrics: Any = None,
                 clock: Callable[[], float] = time.time, dry_run: bool = False, identity: str = "") -> None:
        self.config = config
        self.identity = identity or socket.gethostname()  # the leader named in the stored plan
        self.dry_run = dry_run  # drains are recorded, not written to the store
        self.store = store
        self.actuator = actuator
        self.leading = leading
        self.metrics = metrics
        self.clock = clock
        self.plan: Plan | None = None
        self.last_solve_s = -math.inf
        self.solved_s: float | None = None  # when `plan` was solved
        self.pools = {p.name: _PoolState() for p in config.pools}
        self.capacity = {p.name: p.capacity_rps for p in config.pools}
        self.actions: list[tuple[float, str, str, object]] = []  # (t, pool, action, detail): the audit trail
        self._http = PoolSet(connect_timeout_s=config.scrape_timeout_s)
        self._warn = RateLimitedLog(log, interval_s=60.0)
        self._lead_since_s: float | None = None
        self._routing_version = 0
        self.rank_noise_sd: float | None = None  # the prediction noise the latest keyed solve planned for
        self.plan_rank_noise_sd: float | None = None  # ... and the one `plan` was solved with (a failed solve keeps it)
        self.switch = PoolSetSwitch(config.autoscaler, keep=100)  # the re-solves' keep/switch (the latest 100)

    # -- inputs ---------------------------------------------------------------------------
    def _grid(self, merged: Mapping[str, LengthHistogram], now_s: float) -> tuple[list[float], dict[int, float]]:
        """Rates per bucket over the window, and per bucket the end of its newest slot."""
        cols = len(self.config.output_edges) - 1
        n = (len(self.config.input_edges) - 1) * cols
        rates = [0.0] * n
        seen: dict[int, float] = {}
        fresh = [0.0] * n  # req/s of the current, partial slots
        for model, hist in merged.items():
            if self.config.models and model not in self.config.models:
                continue
            rows = _coarsen(hist.input_edges, self.config.input_edges)
            cols_of = _coarsen(hist.output_edges, self.config.output_edges)
            if rows is None or cols_of is None:
                self._warn.warning(f"edges:{model}", "workload histogram skipped: the control plane's input_edges/"
                                   "output_edges must be a subset of the routers' bucket edges",
                                   extra={"model": model, "input_edges": hist.input_edges,
                                          "output_edges": hist.output_edges})
                continue
            for (_klass, i, j), rate in hist.rates(now_s, self.config.autoscaler.window_s).items():
                rates[rows[i] * cols + cols_of[j]] += rate
            current = int(now_s // hist.slot_s)
            elapsed_s = max(now_s - current * hist.slot_s, self.config.autoscaler.interval_s)
            for (slot, _klass, i, j), count in hist.counts.items():
                if count > 0:
                    k = rows[i] * cols + cols_of[j]
                    seen[k] = max(seen.get(k, -math.inf), min((slot + 1) * hist.slot_s, now_s))
                    if slot == current:
                        fresh[k] += count / elapsed_s
        # Demand in a bucket with no rate over the whole slots yet (the first requests after
        # an idle spell, held while their pool is at zero) counts from the current partial
        # slot, so a pool at zero starts now rather than a whole slot later.
        return [r if r > 0 else f for r, f in zip(rates, fresh, strict=True)], seen

    @property
    def plan_choices(self) -> list[tuple[float, PlanChoice]]:
        """The re-solves' keep/switch choices (`PoolSetSwitch.choices`)."""
        return self.switch.choices

    def _resolve(self, rates: Sequence[float], now_s: float) -> None:
        cols = len(self.config.output_edges) - 1
        grid = [list(rates[r * cols:(r + 1) * cols]) for r in range(len(self.config.input_edges) - 1)]
        options = tuple(PoolOption(p.name, p.gpu, p.tp, p.usd_per_hour, p.capacity_rps,
                                   max_replicas=p.max_replicas) for p in self.config.pools)
        buckets = grid_buckets(self.config.input_edges, self.config.output_edges, grid)
        self.last_solve_s = now_s
        if sum(rates) <= 0:
            return  # nothing to plan from: the previous shares stand, idle pools go to their minimum
        try:
            problem = PlanProblem(buckets, options, headroom_fraction=self.config.headroom,
                                  routing_keys=self._routing_keys(buckets))
            # the pools' min_replicas are the loop's floors: the solve plans with them (with_floors)
            choice = self.switch.resolve(self.plan, problem, now_s)
        except PlanError as exc:
            self._warn.warning("solve", "re-solving the pool plan failed; keeping the previous plan",
                               extra={"error": str(exc)})
            self._count("solve_errors")
            return
        candidate = choice.candidate
        assert candidate is not None  # resolve sets it
        if self.metrics is not None:
            self.metrics.plan_decisions.labels(choice.reason).inc()
        log.info("pool plan re-solved", extra={"decision": choice.reason, "instances": choice.plan.instances(),
                                               "usd_per_hour": round(choice.plan.usd_per_hour, 4),
                                               "candidate": candidate.instances(),
                                               "candidate_usd_per_hour": round(candidate.usd_per_hour, 4),
                                               "solve_s": round(candidate.solve_s, 3),
                                               "route_by": self.config.route_by, "rank_noise_sd": self.rank_noise_sd})
        if choice.plan is self.plan:
            return  # held: the plan, its solve time and its routing table stand
        self.plan = choice.plan
        self.solved_s = now_s
        self.plan_rank_noise_sd = self.rank_noise_sd if problem.routing_keys is not None else None
        if self.metrics is not None:
            self.metrics.plan_usd_per_hour.set(self.plan.usd_per_hour)

    def _routing_keys(self, buckets: Sequence[Bucket]) -> tuple[RoutingKey, ...] | None:
        """With `route_by: predicted`, the keys the routers' ranker sends each cell's
        requests to (the same model as `tokenyard plan --route-by predicted`)."""
        if self.config.route_by != "predicted":
            return None
        noise_sd = self.config.rank_noise_sd
        if noise_sd is None:
            assert self.config.rank_tau is not None  # the config checks that one of the two is set
            noise_sd = grid_noise_sd(buckets, self.config.rank_tau)
        self.rank_noise_sd = noise_sd
        return grid_routing_keys(buckets, self.config.output_edges, noise_sd)

    async def _inflight(self, record: InstanceRecord) -> int | None:
        try:
            response = await self._http.get(record.url).request("GET", "/metrics",
                                                                headers_timeout_s=self.config.scrape_timeout_s)
            body = await response.read_limited(MAX_METRICS_BYTES, self.config.scrape_timeout_s)
        except (UpstreamError, ValueError) as exc:
            self._warn.warning(f"scrape:{record.instance_id}", "in-flight count unreadable; the instance counts as "
                               "busy", extra={"instance": record.instance_id, "error": str(exc)})
            return None
        if response.status != 200:
            return None
        load = parse_vllm_metrics(body.decode("utf-8", "replace"))
        if load.running is None and load.waiting is None:
            return None
        return (load.running or 0) + (load.waiting or 0)

    # -- one tick ---------------------------------------------------------------------------
    async def tick(self) -> dict[str, int]:
        """One control round (no-op unless leading); returns the targets decided."""
        if not self.leading():
            self._lead_since_s = None
            return {}
        now_s = self.clock()
        current = await asyncio.to_thread(self.actuator.current_replicas)
        if self._lead_since_s is None:  # a new leader: adopt the fleet, wait a dwell before shrinking
            self._lead_since_s = now_s
            drains = (await self.store.get_loads()).get(DRAINS_KEY, {})
            for name, state in self.pools.items():
                state.target = current.get(name, 0)
                state.last_change_s = now_s
                adopted = drains.get(name) if isinstance(drains, dict) else None
                if isinstance(adopted, dict):  # the previous leader's drains are ours now
                    state.drained_since_s = {str(i): float(t) for i, t in adopted.items()}
        rates, seen = self._grid(await read_workload(self.store), now_s)
        # Traffic the plan routes nowhere (the first, or a new bucket) cannot wait a whole
        # re-solve interval: that is a scale-from-zero. A bucket that had traffic when the
        # plan was solved and still has no share is a sliver a keyed plan left out of its
        # keys (scheduler.planner.predicted): re-solving would leave it out again.
        uncovered = any(rate > 0 and (self.plan is None or (not self.plan.shares[k]
                                                            and self.plan.buckets[k].rate_rps <= 0))
                        for k, rate in enumerate(rates))
        if uncovered or now_s - self.last_solve_s >= self.config.resolve_interval_s:
            before = self.plan
            # Off the event loop: the solve (and, with rank_tau, the noise calibration, ~0.1-0.2 s)
            # must not hold up the Lease renewal that runs beside it.
            await asyncio.to_thread(self._resolve, rates, now_s)
            if self.plan is not None and self.plan is not before and not self.dry_run and self.leading():
                await self._publish_routing(self.plan, now_s)
        shares = self.plan.shares if self.plan is not None else ()
        by_index = {k: r for k, r in enumerate(rates) if r > 0}
        loads = pool_loads(by_index, shares, self.capacity) if shares else {p: 0.0 for p in self.pools}
        last_request = last_request_by_pool(seen, shares, self.pools)
        observations = [PoolObservation(name, loads.get(name, 0.0), state.target, state.last_change_s,
                                        last_request[name]) for name, state in self.pools.items()]
        targets = decide_targets(self.config.autoscaler, observations, now_s)
        records = await self.store.list_instances()
        for name, target in targets.items():
            state = self.pools[name]
            if target != state.target:
                self._record(now_s, name, "target", {"from": state.target, "to": target,
                                                     "load_instances": round(loads.get(name, 0.0), 3)})
                state.target, state.last_change_s = target, now_s
            if not self.leading():  # lost the Lease during this round: act no further
                break
            await self._step_pool(name, target, current.get(name, 0), [r for r in records if r.pool == name], now_s)
        self._publish(targets, current, loads)
        await self._save_plan(targets, current, loads, now_s)
        return targets

    async def _save_plan(self, targets: Mapping[str, int], current: Mapping[str, int], loads: Mapping[str, float],
                         now_s: float) -> None:
        if self.dry_run or not self.leading():  # a dry run writes nothing; a lost Lease, no more
            return
        doc = plan_document(plan=self.plan, solved_s=self.solved_s, now_s=now_s, leader=self.identity,
                            pools={p.name: (p.gpu, p.tp) for p in self.config.pools}, current=current,
                            targets=targets, loads=loads,
                            draining={name: len(state.drained_since_s) for name, state in self.pools.items()},
                            route_by=self.config.route_by, rank_tau=self.config.rank_tau,
                            rank_noise_sd=self.plan_rank_noise_sd)
        await self.store.put_load(PLAN_KEY, doc, PLAN_TTL_S)

    async def _step_pool(self, pool: str, target: int, replicas: int, records: Sequence[InstanceRecord],
                         now_s: float) -> None:
        state = self.pools[pool]
        state.drained_since_s = {i: t for i, t in state.drained_since_s.items() if any(r.instance_id == i
                                                                                      for r in records)}
        views = []
        for record in records:
            ours = state.drained_since_s.get(record.instance_id)
            inflight = await self._inflight(record) if record.draining and ours is not None else 0
            views.append(LiveInstance(record.instance_id, record.draining, inflight, ours))
        step = pool_step(target, replicas, views, now_s, self.config.drain_grace_s)
        before = dict(state.drained_since_s)
        for instance_id in step.undrain:
            if not self.dry_run:
                await self.store.set_draining(instance_id, False)
                record = next(r for r in records if r.instance_id == instance_id)
                await asyncio.to_thread(self.actuator.undrained, record)
            state.drained_since_s.pop(instance_id, None)
            self._record(now_s, pool, "undrain", instance_id)
        for instance_id in step.drain:
            if not self.dry_run:
                await self.store.set_draining(instance_id, True)
                state.drained_since_s[instance_id] = now_s
            self._record(now_s, pool, "drain", instance_id)
        if state.drained_since_s != before:
            await self._save_drains()
        if step.replicas is None:
            return
        removing = [r for r in records if r.instance_id in step.remove]
        done = await asyncio.to_thread(self.actuator.set_replicas, pool, step.replicas, removing)
        if done:
            self._record(now_s, pool, "scale_up" if step.replicas > replicas else "scale_down",
                         {"from": replicas, "to": step.replicas, "removed": [r.instance_id for r in removing]})
            for record in removing:
                state.drained_since_s.pop(record.instance_id, None)
                if self.config.actuator == "print" and not self.dry_run:
                    await self.store.remove_instance(record.instance_id)  # stopped by the operator
            await self._save_drains()

    async def _publish_routing(self, plan: Plan, now_s: float) -> None:
        """The new plan's length-bucket routing for every router (their RoutingFollower).
        Versions are wall-clock milliseconds, so a new leader's plans supersede the old one's."""
        table = table_from_plan(plan, self.config.input_edges, self.config.output_edges)
        version = max(int(now_s * 1000), self._routing_version + 1)
        await publish_routing(self.store, version, table, plan.usd_per_hour)
        self._routing_version = version
        self._record(now_s, "*", "routing", {"version": version, "instances": plan.instances()})

    async def _save_drains(self) -> None:
        if not self.dry_run:
            await self.store.put_load(DRAINS_KEY, {name: dict(state.drained_since_s)
                                                   for name, state in self.pools.items()}, DRAINS_TTL_S)

    def _record(self, now_s: float, pool: str, action: str, detail: object) -> None:
        self.actions.append((now_s, pool, action, detail))
        del self.actions[:-1000]  # bounded audit trail
        log.info("control plane action", extra={"pool": pool, "action": action, "detail": str(detail)})
        if self.metrics is not None:
            self.metrics.scale_actions.labels(pool, action).inc()

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()

    def _publish(self, targets: Mapping[str, int], current: Mapping[str, int], loads: Mapping[str, float]) -> None:
        if self.metrics is None:
            return
        for name in self.pools:
            self.metrics.target_replicas.labels(name).set(targets.get(name, 0))
            self.metrics.replicas.labels(name).set(current.get(name, 0))
            self.metrics.load_instances.labels(name).set(loads.get(name, 0.0))
            self.metrics.draining.labels(name).set(len(self.pools[name].drained_since_s))
        self.metrics.ticks.inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `interval_s` until `stop`; a failed tick is logged and retried."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # the store or the API down: the next tick retries
                self._warn.warning("tick", "control round failed", extra={"error": str(exc)})
                self._count("tick_errors")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.autoscaler.interval_s)

    def close(self) -> None:
        self._http.close()
