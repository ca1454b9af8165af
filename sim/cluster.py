"""A simulated cluster described in YAML: pools of GPU type x model x tensor-parallel x count,
the engine settings of each pool, the dispatch and queue policies by name, SLO classes.

    catalog: my_catalog.yaml          # optional: a path, or inline {gpus: [...], models: [...]}
    default_model: llama-3-8b         # for trace requests that name no model (default: pools[0]);
                                      # may be the policy document's tier alias (`tiers:`)
    pools:
      - name: a100
        gpu: A100-80GB
        model: llama-3-8b
        tp: 1
        count: 2
        engine: {max_num_seqs: 256, max_num_batched_tokens: 8192, block_size: 16,
                 enable_prefix_caching: true, num_kv_blocks: null, max_model_len: null,
                 gpu_memory_utilization: 0.9, scheduling_policy: fcfs, admit_preemption: false}
                                      # scheduling_policy: priority when the queue policy sets
                                      # engine priorities; admit_preemption: true preempts a
                                      # lower-priority running request to admit a waiting one
                                      # (vLLM V0's priority scheduler; default vLLM V1's)
    dispatch:                         # scheduler.dispatch.build_policy
      filters: [model, healthy, not_draining, not_cordoned]
      scorers: [least_outstanding]
      picker: max_score
      per_slo_class:                  # optional: a whole dispatch config per SLO class,
        batch: {picker: round_robin}  # keys it sets replace the cluster-wide ones
    queue: {policy: fcfs}             # or slo_priority; scheduler.queueing
    slo_classes: {interactive: {ttft_ms: 1000, tpot_ms: 100, priority: 0}, ...}
    cordoned: [a100-1]                # instances cordoned from the start (as `tokenyard instances
                                      # cordon`): they serve nothing new, keep what they run
    load_refresh_s: 0                 # 0: dispatch sees live engine load; > 0: load as a
                                      # router scraping /metrics that often sees it
    policy: {...}                     # or a path: the policy document (docs/policy.md),
                                      # instead of dispatch, queue and slo_classes

With `policy:` the simulator decides exactly as a router with the same document does
(window, session affinity, admission queue). A file in the older dialect (`dispatch`,
`queue`, `slo_classes`) is converted with the meaning it had: every instance scored, no
affinity table, no admission queue (`tokenyard config migrate` prints the converted file).

Every error names the file, the key path and what was expected (tokenyard.config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from scheduler.catalog import (
    Catalog,
    CatalogError,
    GpuSpec,
    ModelSpec,
    default_catalog,
    extend_catalog,
    tensor_parallel_problem,
)
from scheduler.dispatch import DispatchPolicy, build_policy
from scheduler.dispatch_parts import PolicyConfigError
from scheduler.engine_model import (
    NO_FRONT_END,
    EngineModel,
    FrontEndCost,
    PerfFactors,
    factors_from_table,
)
from scheduler.policy_document import PolicyDocument, PolicyDocumentError, load_policy_document
from scheduler.queue_orders import build_queue_policy
from scheduler.queueing import QueuePolicy, QueuePolicyError
from scheduler.types import SloClass
from sim.engine_core import EngineConfig, EngineConfigError
from tokenyard.config import (
    ConfigError,
    check_keys,
    get,
    load_policy,
    load_yaml,
    parse_slo_classes,
    sim_dialect_to_policy,
)

T = TypeVar("T")

_TOP_KEYS = ("catalog", "default_model", "pools", "dispatch", "queue", "slo_classes", "load_refresh_s", "policy",
             "front_end", "cordoned")
_POLICY_KEYS = ("dispatch", "queue", "slo_classes")  # the older dialect the document replaces
_POOL_KEYS = ("name", "gpu", "model", "tp", "count", "engine")
_ENGINE_KEYS = (
    "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
    "scheduling_policy", "num_kv_blocks", "max_model_len", "gpu_memory_utilization", "admit_preemption",
)
_DISPATCH_KEYS = ("filters", "scorers", "picker", "seed", "per_slo_class")


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """`count` identical engine instances of one (GPU, model, tp) with one engine config."""

    name: str
    gpu: GpuSpec
    model: ModelSpec
    tp: int
    count: int
    engine: EngineConfig
    gpu_memory_utilization: float = 0.9
    factors: PerfFactors | None = None  # None: the packaged fit for this GPU (`--factors` overrides)

    def engine_model(self) -> EngineModel:
        return EngineModel(self.gpu, self.model, self.tp, factors=self.factors,
                           gpu_memory_utilization=self.gpu_memory_utilization)

    def instance_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)]

    @property
    def usd_per_hour(self) -> float:
        """Price of one instance (all its tensor-parallel GPUs)."""
        return self.gpu.usd_per_hour * self.tp


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """A validated cluster: what `simulate` runs."""

    pools: tuple[PoolSpec, ...]
    dispatch: Mapping[str, Any]  # build_policy config, without per_slo_class
    dispatch_per_slo_class: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    queue_policy: str | Mapping[str, Any] = "fcfs"
    slo_classes: Mapping[str, SloClass] = field(default_factory=dict)
    default_model: str = ""
    catalog: Catalog = field(default_factory=default_catalog)
    load_refresh_s: float = 0.0
    source: str = "<cluster>"
    label: str = ""  # a name for comparisons (the policy variant), "" for the configured one
    policy: PolicyDocument | None = None  # the `policy:` document; None: the older dialect's fields

    def document(self) -> PolicyDocument:
        """The policy document the simulation decides by (the older dialect converted)."""
        if self.policy is not None:
            return self.policy
        return load_policy_document(sim_dialect_to_policy(
            slo_classes=self.slo_classes, dispatch=self.dispatch, per_slo_class=self.dispatch_per_slo_class,
            queue_policy=self.queue_policy), where="")
    # Router + API server time per request added to simulated TTFT and E2E (`front_end:`).
    front_end: FrontEndCost = field(default_factory=FrontEndCost)
    # Instance ids cordoned from the start (no new requests; `Simulation.set_cordoned`
    # changes it during a run), as the router's cordon flag.
    cordoned: tuple[str, ...] = ()

    @property
    def num_instances(self) -> int:
        return sum(p.count for p in self.pools)

    def build_dispatch(self, seed: int = 0) -> DispatchPolicy:
        return build_policy(self.dispatch, where="dispatch", seed=seed)

    def build_dispatch_per_class(self, seed: int = 0) -> dict[str, DispatchPolicy]:
        """One policy per SLO class that overrides the cluster-wide dispatch."""
        return {
            name: build_policy(_merged(self.dispatch, override), where=f"dispatch.per_slo_class.{name}", seed=seed)
            for name, override in self.dispatch_per_slo_class.items()
        }

    def build_queue_policy(self) -> QueuePolicy:
        return build_queue_policy(self.queue_policy)

    def describe_dispatch(self) -> str:
        picker = self.dispatch.get("picker", "max_score")
        scorers = self.dispatch.get("scorers", ["least_outstanding"])
        return f"picker={_part_name(picker)} scorers={','.join(_part_name(s) for s in scorers)}"


def with_factors(cluster: ClusterSpec, table: Mapping[str, PerfFactors]) -> ClusterSpec:
    """The cluster with every pool's engine model taking its GPU's entry of a factors file
    (`scheduler.engine_model.load_factors_file`; `"*"` for GPU types it does not list)."""
    pools = tuple(replace(p, factors=factors_from_table(table, p.gpu)) for p in cluster.pools)
    return replace(cluster, pools=pools)


def _part_name(spec: Any) -> str:
    if isinstance(spec, Mapping) and len(spec) == 1:
        return str(next(iter(spec)))
    return str(spec)


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    merged.update(override)
    return merged


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster YAML file."""
    path = Path(path)
    return parse_cluster(load_yaml(path), str(path), base_dir=path.parent)


def parse_cluster(doc: Mapping[str, Any], source: str, base_dir: Path | None = None) -> ClusterSpec:
    """Validate a parsed cluster document; `source` names it in errors (a file path)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(source, f"expected a mapping at the top level, got {type(doc).__name__}")
    check_keys(doc, _TOP_KEYS, source)
    where = f"{source}:"
    catalog = _parse_catalog(doc.get("catalog"), source, base_dir)
    document: PolicyDocument | None = None
    if doc.get("policy") is not None:
        mixed = [key for key in _POLICY_KEYS if key in doc]
        if mixed:
            raise ConfigError(f"{where} {mixed[0]}", "the policy document (`policy:`) replaces this key: move it "
                                                    "into the document, or run `tokenyard config migrate` on a "
                                                    "file without `policy:`")
        document = load_policy(doc["policy"], source, base_dir)
        slo_classes = document.slo_class_map()
        queue_policy: str | Mapping[str, Any] = document.queue.engine_priority
        queue_needs_priority = document.build_engine_priority().needs_engine_priority
    else:
        slo_classes = parse_slo_classes(doc.get("slo_classes"), f"{where} slo_classes")
        queue_policy, queue_needs_priority = _parse_queue(doc.get("queue"), source)

    raw_pools = doc.get("pools")
    if not isinstance(raw_pools, list) or not raw_pools:
        raise ConfigError(f"{where} pools", "expected a non-empty list of pools ({name, gpu, model, count})")
    pools: list[PoolSpec] = []
    names: set[str] = set()
    for index, raw in enumerate(raw_pools):
        pool = _parse_pool(raw, f"{where} pools[{index}]", catalog, queue_needs_priority)
        if pool.name in names:
            raise ConfigError(f"{where} pools[{index}].name", f"duplicate pool name {pool.name!r}")
        names.add(pool.name)
        pools.append(pool)

    served = {p.model.name.lower(): p.model.name for p in pools}
    default_model = _top_get(doc, "default_model", str, source, default=pools[0].model.name)
    tier_alias = document.tiers.alias.lower() if document is not None and document.tiers is not None else None
    if default_model.lower() not in served and default_model.lower() != tier_alias:
        raise ConfigError(
            f"{where} default_model",
            f"no pool serves {default_model!r}; served models: {', '.join(sorted(served.values()))}",
        )
    if document is not None:
        dispatch = document.profile_config(document.selection.default)
        per_class = {cls: document.profile_config(name) for cls, name in document.selection.by_slo_class.items()}
    else:
        dispatch, per_class = _parse_dispatch(doc.get("dispatch"), source, slo_classes)
    load_refresh_s = _top_get(doc, "load_refresh_s", float, source, default=0.0, minimum=0.0)
    cordoned = _parse_cordoned(doc.get("cordoned"), f"{where} cordoned", pools)
    spec = ClusterSpec(
        pools=tuple(pools),
        dispatch=dispatch,
        dispatch_per_slo_class=per_class,
        queue_policy=queue_policy,
        slo_classes=slo_classes,
        default_model=served.get(default_model.lower(), default_model),  # or the tier alias
        catalog=catalog,
        load_refresh_s=load_refresh_s,
        source=source,
        policy=document,
        front_end=_parse_front_end(doc.get("front_end", True), f"{where} front_end"),
        cordoned=cordoned,
    )
    if document is None:
        try:
            spec.document()
        except PolicyDocumentError as exc:
            raise ConfigError(source, f"{exc} (converting the older dialect into a policy document)") from None
    return spec


def _parse_cordoned(raw: Any, where: str, pools: Sequence[PoolSpec]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError(where, f"expected a list of instance ids (<pool>-<index>, e.g. {pools[0].name}-0), "
                                 f"got {raw!r}")
    known = {iid for pool in pools for iid in pool.instance_ids()}
    for i, iid in enumerate(raw):
        if iid not in known:
            raise ConfigError(f"{where}[{i}]", f"no instance {iid!r}; instances are <pool>-<index>: "
                                               f"{', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''}")
    return tuple(dict.fromkeys(raw))


def _parse_front_end(raw: Any, where: str) -> FrontEndCost:
    """`front_end: false` (none), true / absent (the measured default), or
    `{fixed_ms, per_prompt_token_us}`."""
    if raw is True:
        return FrontEndCost()
    if raw is False:
        return NO_FRONT_END
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected true, false or a mapping with fixed_ms / per_prompt_token_us, got {raw!r}")
    try:
        return FrontEndCost.from_mapping(raw, where)
    except ValueError as exc:
        raise ConfigError(where, str(exc).split(": ", 1)[-1]) from exc


def _top_get(doc: Mapping[str, Any], key: str, kind: type[T], source: str, **kwargs: Any) -> T:
    """`get` for a top-level key: the path reads `file: key`."""
    try:
        return get(doc, key, kind, "", **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.where}", exc.problem) from exc


def _parse_catalog(raw: Any, source: str, base_dir: Path | None) -> Catalog:
    catalog = default_catalog()
    if raw is None:
        return catalog
    where = f"{source}: catalog"
    if isinstance(raw, str):
        path = Path(raw)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        document: Mapping[str, Any] = load_yaml(path)
        doc_source = str(path)
    elif isinstance(raw, Mapping):
        document, doc_source = raw, where
    else:
        raise ConfigError(where, f"expected a path to a catalog YAML or a mapping with gpus/models, got {raw!r}")
    try:
        return extend_catalog(catalog, document, doc_source)
    except CatalogError as exc:
        raise ConfigError(doc_source, str(exc).removeprefix(f"{doc_source}: ")) from exc


def _parse_queue(raw: Any, source: str) -> tuple[str | Mapping[str, Any], bool]:
    where = f"{source}: queue"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping like {{policy: fcfs}}, got {raw!r}")
    check_keys(raw, ("policy",), where)
    spec = raw.get("policy", "fcfs")
    try:
        policy = build_queue_policy(spec, where=f"{where}.policy")
    except QueuePolicyError as exc:
        raise ConfigError(f"{where}.policy", str(exc).removeprefix(f"{where}.policy: ")) from exc
    return spec, policy.needs_engine_priority


def _parse_pool(raw: Any, where: str, catalog: Catalog, queue_needs_priority: bool) -> PoolSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping with name, gpu, model, count; got {raw!r}")
    check_keys(raw, _POOL_KEYS, where)
    name = get(raw, "name", str, where)
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"{where}.name", f"expected a non-empty name without spaces, got {name!r}")
    try:
        gpu = catalog.gpu(get(raw, "gpu", str, where))
    except CatalogError as exc:
        raise ConfigError(f"{where}.gpu", str(exc)) from exc
    try:
        model = catalog.model(get(raw, "model", str, where))
    except CatalogError as exc:
        raise ConfigError(f"{where}.model", str(exc)) from exc
    tp = get(raw, "tp", int, where, default=1, minimum=1)
    count = get(raw, "count", int, where, minimum=0)
    engine_raw = raw.get("engine") or {}
    engine_where = f"{where}.engine"
    if not isinstance(engine_raw, Mapping):
        raise ConfigError(engine_where, f"expected a mapping of engine settings, got {engine_raw!r}")
    check_keys(engine_raw, _ENGINE_KEYS, engine_where)
    default_policy = "priority" if queue_needs_priority else "fcfs"
    scheduling_policy = get(
        engine_raw, "scheduling_policy", str, engine_where, default=default_policy, choices=("fcfs", "priority")
    )
    if queue_needs_priority and scheduling_policy != "priority":
        raise ConfigError(
            f"{engine_where}.scheduling_policy",
            "the queue policy sets request priorities, so engines must use 'priority' (or leave it unset)",
        )
    admit_preemption = get(engine_raw, "admit_preemption", bool, engine_where, default=False)
    if admit_preemption and scheduling_policy != "priority":
        raise ConfigError(
            f"{engine_where}.admit_preemption",
            "preempting to admit a waiting request goes by request priority: it needs "
            "scheduling_policy 'priority' (or a queue policy that sets engine priorities)",
        )
    optional_ints = {}
    for key in ("num_kv_blocks", "max_model_len"):
        value = engine_raw.get(key)
        optional_ints[key] = None if value is None else get(engine_raw, key, int, engine_where, minimum=1)
    try:
        engine = EngineConfig(
            block_size=get(engine_raw, "block_size", int, engine_where, default=16, minimum=1),
            max_num_seqs=get(engine_raw, "max_num_seqs", int, engine_where, default=256, minimum=1),
            max_num_batched_tokens=get(
                engine_raw, "max_num_batched_tokens", int, engine_where, default=8192, minimum=1
            ),
            enable_prefix_caching=get(engine_raw, "enable_prefix_caching", bool, engine_where, default=True),
            scheduling_policy=scheduling_policy,
            admit_preemption=admit_preemption,
            max_model_len=optional_ints["max_model_len"],
            num_kv_blocks=optional_ints["num_kv_blocks"],
        )
    except EngineConfigError as exc:
        raise ConfigError(engine_where, str(exc)) from exc
    utilization = get(engine_raw, "gpu_memory_utilization", float, engine_where, default=0.9)
    if not 0.0 < utilization <= 1.0:
        raise ConfigError(f"{engine_where}.gpu_memory_utilization", f"expected a number in (0, 1], got {utilization}")
    tp_problem = tensor_parallel_problem(model, tp)
    if tp_problem:
        raise ConfigError(f"{where}.tp", tp_problem)
    if engine.max_model_len is not None and engine.max_model_len > model.max_context_tokens:
        raise ConfigError(f"{engine_where}.max_model_len", f"expected at most {model.name}'s context length "
                                                           f"({model.max_context_tokens} tokens), got {engine.max_model_len}")
    pool = PoolSpec(name, gpu, model, tp, count, engine, utilization)
    if engine.num_kv_blocks is None and pool.engine_model().kv_capacity_blocks(engine.block_size) <= 0:
        raise ConfigError(
            where,
            f"{model.name} does not fit on {gpu.name} x tp {tp} with room for a KV cache "
            f"({gpu.memory_gib} GiB per GPU); use a larger GPU or a higher tp",
        )
    return pool


def _parse_dispatch(
    raw: Any, source: str, slo_classes: Mapping[str, SloClass]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    where = f"{source}: dispatch"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping with filters, scorers, picker; got {raw!r}")
    check_keys(raw, _DISPATCH_KEYS, where)
    base = {k: v for k, v in raw.items() if k != "per_slo_class"}
    _check_policy(base, where)
    per_class_raw = raw.get("per_slo_class") or {}
    if not isinstance(per_class_raw, Mapping):
        raise ConfigError(f"{where}.per_slo_class", "expected a mapping of SLO class name to a dispatch config")
    per_class: dict[str, dict[str, Any]] = {}
    for name, override in per_class_raw.items():
        path = f"{where}.per_slo_class.{name}"
        if name not in slo_classes:
            raise ConfigError(path, f"unknown SLO class {name!r}; known: {', '.join(sorted(slo_classes))}")
        if not isinstance(override, Mapping):
            raise ConfigError(path, "expected a dispatch config (filters, scorers, picker)")
        check_keys(override, ("filters", "scorers", "picker", "seed"), path)
        per_class[str(name)] = dict(override)
        _check_policy(_merged(base, override), path)
    return base, per_class


def _check_policy(config: Mapping[str, Any], where: str) -> None:
    short = where.split(": ", 1)[1] if ": " in where else where
    try:
        build_policy(config, where=short)
    except PolicyConfigError as exc:
        raise ConfigError(where.split(": ", 1)[0], str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from exc


# --------------------------------------------------------------- policy comparisons

#: Dispatch configs of the baseline policies by name, for `tokenyard sim compare`.
DISPATCH_PRESETS: dict[str, dict[str, Any]] = {
    "round_robin": {"scorers": [], "picker": "round_robin"},
    "random": {"scorers": [], "picker": "random"},
    "least_outstanding": {"scorers": ["least_outstanding"], "picker": "max_score"},
    "least_kv": {"scorers": ["least_kv"], "picker": "max_score"},
    "power_of_two": {"scorers": ["least_outstanding"], "picker": "power_of_two"},
    "session_affinity": {"scorers": ["least_outstanding"], "picker": "session_affinity"},
    "prefix_affinity": {"scorers": ["least_outstanding"], "picker": "prefix_affinity"},
}


def policy_variants(cluster: ClusterSpec, names: Sequence[str]) -> list[ClusterSpec]:
    """One copy of `cluster` per dispatch policy name, labelled with the name.

    A name is a preset (`DISPATCH_PRESETS`: round_robin, least_kv, ...) whose config replaces
    the cluster's dispatch (filters are kept), or `configured` for the cluster as written.
    Per-SLO-class overrides are dropped in presets so that every class uses the named policy.
    """
    variants: list[ClusterSpec] = []
    for name in names:
        if name == "configured":
            variants.append(replace(cluster, label="configured"))
            continue
        preset = DISPATCH_PRESETS.get(name)
        if preset is None:
            known = ", ".join(sorted([*DISPATCH_PRESETS, "configured"]))
            raise ConfigError("policies", f"unknown policy {name!r}; known: {known}")
        dispatch = dict(preset)
        if "filters" in cluster.dispatch:
            dispatch["filters"] = cluster.dispatch["filters"]
        policy = cluster.policy.with_profile(dispatch) if cluster.policy is not None else None
        variants.append(replace(cluster, dispatch=dispatch, dispatch_per_slo_class={}, label=name, policy=policy))
    return variants
