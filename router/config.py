"""The router's config file (`tokenyard router --config router.yaml`), validated up front.

Every error names the file, the key path and what was expected (tokenyard/config.py);
nothing starts from a file that failed to validate. Shape, all keys optional:

    listen: {host: 127.0.0.1, port: 8000}   # off loopback with no tenant keys: refused unless
                                            # allow_anonymous: true (serve anyone on purpose)
    store: file:///abs/path/state.json      # or redis://host:6379/0?prefix=ty
    control: {host: 127.0.0.1, port: 50051, # gRPC Admin + Picker services; bearer tokens,
              tokens_file: tokens.yaml}     # TLS, CIDRs: router/auth.py
    limits: {max_request_bytes: 4194304}
    slo_classes: {interactive: {ttft_ms: 1000, tpot_ms: 100, priority: 0}, ...}
    tenants:
      acme: {api_keys: [sk-acme-1], slo_class: interactive, policy: headroom,
             retry_budget: {ratio: 0.2, min_per_s: 5, burst: 50}}
    anonymous: {slo_class: default}         # requests without a key; default: allowed
                                            # only when no tenant has keys
    policies:                               # named dispatch policies (scheduler.dispatch)
      default: {scorers: [least_outstanding]}
      headroom: {scorers: [slo_headroom, {least_outstanding: {weight: 0.1}}]}
    dispatch: {default_policy: default, by_slo_class: {interactive: headroom},
               max_candidates: 16, forward_priority: true, affinity_ttl_s: 600}
    retries: {max_attempts: 3, connect_timeout_s: 1.0, first_byte_timeout_s: 30}
    deadlines_ms: {interactive: 10000}      # per SLO class; default 10 x TTFT SLO, >= 30 s
    health: {interval_s: 2, timeout_s: 1, eject_after_failures: 3, eject_s: 5, max_eject_s: 60}
    load: {scrape_interval_s: 0.25, timeout_s: 1,
           worker_token_file: worker-token}   # the engines' --worker-token-file (0600)
    metrics: {plugin_sample_every: 16}      # time each dispatch part in 1 decision of N (0: off)
    discovery: {static: [{url: http://127.0.0.1:8001, model: llama-3-8b, gpu: A100-80GB}]}
    policy: {...}                           # or a path: the policy document (docs/policy.md)

Decision settings live in the policy document (`policy:`, embedded or a path relative to
this file): SLO classes, dispatch profiles and their selection, the candidate window,
session affinity, queue order and admission. A file without `policy:` is read in the
older dialect (`slo_classes`, `policies`, `dispatch`) and converted with the meaning it
had; a file may not mix both (`tokenyard config migrate FILE` converts it).

The model tier alias is the document's `tiers:` section (scheduler/tier_document.py,
router/tiers.py). The older top-level `tiers:` key still loads: it is converted into the
document (an error if the document has one too).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.dispatch import build_policy
from scheduler.dispatch_parts import PolicyConfigError
from scheduler.policy_document import PolicyDocument, PolicyDocumentError, load_policy_document
from scheduler.types import SloClass
from tokenyard.config import (
    ConfigError,
    check_keys,
    get,
    load_policy,
    load_yaml,
    parse_slo_classes,
    router_dialect_to_policy,
)
from tokenyard.worker_auth import is_loopback

DEFAULT_POLICY: dict[str, Any] = {"filters": ["model", "healthy", "not_draining", "not_cordoned"], "scorers": ["least_outstanding"]}
TOP_KEYS = ("listen", "store", "control", "limits", "slo_classes", "tenants", "anonymous", "policies",
            "dispatch", "retries", "deadlines_ms", "health", "load", "discovery", "policy", "tiers", "rank",
            "metrics", "records")
# Keys of the older dialect that the policy document replaces.
POLICY_KEYS = ("slo_classes", "policies", "dispatch")
MAX_PORT = 65535
REDIS_MAX_DB = 15  # Redis ships with `databases 16`

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TenantConfig:
    name: str
    api_keys: list[str]
    slo_class: str
    policy: str | None
    retry_ratio: float = 0.2
    retry_min_per_s: float = 5.0
    retry_burst: float = 50.0


@dataclass(slots=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 1.0
    eject_after_failures: int = 3
    eject_s: float = 5.0
    max_eject_s: float = 60.0


@dataclass(slots=True)
class RouterConfig:
    source: str = "<defaults>"
    host: str = "127.0.0.1"
    port: int = 8000
    allow_anonymous_off_loopback: bool = False  # listen.allow_anonymous: see check_front_door
    store_url: str | None = None
    control_host: str | None = None
    control_port: int | None = None
    control_auth: Any = None  # router.auth.ControlAuth: tokens, TLS, registration CIDRs
    max_request_bytes: int = 4 * 1024 * 1024
    slo_classes: dict[str, SloClass] = field(default_factory=lambda: parse_slo_classes(None, "slo_classes"))
    tenants: list[TenantConfig] = field(default_factory=list)
    anonymous_slo_class: str | None = "default"
    policies: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": dict(DEFAULT_POLICY)})
    default_policy: str = "default"
    policy_by_slo_class: dict[str, str] = field(default_factory=dict)
    max_candidates: int = 16
    forward_priority: bool = True
    affinity_ttl_s: float = 600.0
    max_attempts: int = 3
    connect_timeout_s: float = 1.0
    first_byte_timeout_s: float | None = None
    deadlines_ms: dict[str, float] = field(default_factory=dict)
    health: HealthConfig = field(default_factory=HealthConfig)
    scrape_interval_s: float = 0.25
    scrape_timeout_s: float = 1.0
    worker_token_file: str | None = None  # the engines' Worker gRPC bearer token (tokenyard/worker_auth.py)
    worker_token: str | None = field(default=None, repr=False)
    discovery: dict[str, Any] = field(default_factory=dict)
    policy: PolicyDocument = field(default_factory=PolicyDocument)
    tiers: dict[str, Any] = field(default_factory=dict)  # model tier alias (router/tiers.py)
    rank: Any = None  # router.rank.RankSettings: the output-length ranker; None = off
    # tokenyard_router_plugin_seconds times every part of 1 decision in this many (0: none);
    # timing all of them cost ~8 us a decision (router/admission.py PluginMetrics).
    plugin_sample_every: int = 16
    records: Any = None  # router.records.RecordsSettings: one JSON line per finished request; None = off

    def deadline_s(self, slo_class: str, stream: bool = True, max_output_tokens: int | None = None) -> float:
        """How long a request of this class may wait for its first byte.

        A non-streaming answer's first byte comes after its last token, so it also gets
        twice the class's TPOT target per token it may generate (2,048 when unbounded).
        """
        slo = self.slo_classes.get(slo_class)
        if slo_class in self.deadlines_ms:
            first_byte_s = self.deadlines_ms[slo_class] / 1000.0
        else:
            ttft_ms = slo.ttft_slo_ms if slo is not None else 3000.0
            first_byte_s = max(30.0, 10.0 * ttft_ms / 1000.0)
        if stream:
            return first_byte_s
        tpot_s = (slo.tpot_slo_ms if slo is not None else 200.0) / 1000.0
        return first_byte_s + 2.0 * tpot_s * (max_output_tokens or 2048)


def check_front_door(cfg: RouterConfig) -> None:
    """Refuse a front door off loopback that would serve anyone: no tenant has an API key
    and requests without one are admitted (the anonymous tenant), unless the config says so
    on purpose (`listen.allow_anonymous: true`, as the Helm chart sets it behind its
    NetworkPolicy). Run again after a `--host` override. ConfigError naming the fixes."""
    if is_loopback(cfg.host) or cfg.anonymous_slo_class is None or cfg.allow_anonymous_off_loopback:
        return
    if any(t.api_keys for t in cfg.tenants):
        return  # anonymous kept on purpose (`anonymous: {...}` with keys configured)
    raise ConfigError(f"{cfg.source}: listen.host",
                      f"{cfg.host} is not a loopback address and no tenant has an API key, so anyone who "
                      "reaches it is served; expected tenants with api_keys, `anonymous: false`, a loopback "
                      "host, or `listen: {allow_anonymous: true}` to serve without keys on purpose")


def load_router_config(path: str | Path) -> RouterConfig:
    doc = load_yaml(path)
    if not doc:
        raise ConfigError(str(path), "the config file is empty; expected a mapping (e.g. `listen: {port: 8000}`; "
                                     "see router/examples/production.yaml)")
    return parse_router_config(doc, str(path), base_dir=Path(path).parent)


def parse_router_config(doc: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> RouterConfig:
    """Validate a router config document; `source` prefixes every error's key path."""

    def at(key: str) -> str:
        return f"{source}: {key}"

    check_keys(doc, TOP_KEYS, source)
    cfg = RouterConfig(source=source)
    document: PolicyDocument | None = None
    if doc.get("policy") is not None:
        mixed = [key for key in POLICY_KEYS if key in doc]
        if mixed:
            raise ConfigError(at(mixed[0]), "the policy document (`policy:`) replaces this key: move it into the "
                                            "document, or run `tokenyard config migrate` on a file without `policy:`")
        document = load_policy(doc["policy"], source, base_dir)

    listen = _section(doc, "listen", source)
    check_keys(listen, ("host", "port", "allow_anonymous"), at("listen"))
    cfg.host = get(listen, "host", str, at("listen"), default=cfg.host)
    cfg.port = _port(listen, at("listen"), cfg.port)
    cfg.allow_anonymous_off_loopback = get(listen, "allow_anonymous", bool, at("listen"), default=False)

    if "store" in doc:
        store = get(doc, "store", str, source)
        if not store.startswith(("file://", "redis://", "rediss://")):
            raise ConfigError(at("store"), f"expected file:///abs/path.json or redis://host:port/db, got {store!r}")
        if store.startswith(("redis://", "rediss://")):
            _check_redis_url(store, at("store"))
        cfg.store_url = store

    control = _section(doc, "control", source)
    if control:
        from router.auth import CONTROL_KEYS, parse_control_auth

        check_keys(control, CONTROL_KEYS, at("control"))
        cfg.control_host = get(control, "host", str, at("control"), default="127.0.0.1")
        cfg.control_port = _port(control, at("control"), None)
        cfg.control_auth = parse_control_auth(control, cfg.control_host, at("control"))

    limits = _section(doc, "limits", source)
    check_keys(limits, ("max_request_bytes",), at("limits"))
    cfg.max_request_bytes = get(limits, "max_request_bytes", int, at("limits"), default=cfg.max_request_bytes, minimum=1)

    if document is not None:
        _apply_document(cfg, document)
    else:
        _parse_old_dialect(cfg, doc, source)
    classes = sorted(cfg.slo_classes)
    policy_names = sorted(cfg.policies)
    _parse_tenants(cfg, doc, source, classes, policy_names, document)
    _parse_rest(cfg, doc, source, classes)
    check_front_door(cfg)
    if document is None:
        try:
            document = load_policy_document(router_dialect_to_policy(
                slo_classes=cfg.slo_classes, policies=cfg.policies, default_policy=cfg.default_policy,
                by_slo_class=cfg.policy_by_slo_class,
                tenant_policies={t.name: t.policy for t in cfg.tenants if t.policy is not None},
                max_candidates=cfg.max_candidates, forward_priority=cfg.forward_priority,
                affinity_ttl_s=cfg.affinity_ttl_s), where="")
        except PolicyDocumentError as exc:
            raise ConfigError(source, f"{exc} (converting the older dialect into a policy document)") from None
    cfg.policy = _apply_tiers(cfg, document, source)
    return cfg


def _apply_tiers(cfg: RouterConfig, document: PolicyDocument, source: str) -> PolicyDocument:
    """The document with the tier section: its own `tiers:`, or the older top-level one
    converted into it (never both); `cfg.tiers` is the section router/tiers.py builds,
    validated now with its model file."""
    from router.tiers import build_tier_resolver
    from scheduler.tiers import TierConfigError

    key = "tiers"
    if cfg.tiers:
        if document.tiers is not None:
            raise ConfigError(f"{source}: tiers",
                              "the policy document has a `tiers:` section; give the tier alias in one place")
        try:
            document = load_policy_document({**document.to_dict(), "tiers": cfg.tiers}, where="")
        except PolicyDocumentError as exc:
            raise ConfigError(f"{source}: tiers", str(exc)) from None  # the older section's own message
    elif document.tiers is not None:
        key = "policy.tiers"
    if document.tiers is None:
        return document
    cfg.tiers = document.tiers.to_section()
    try:
        build_tier_resolver(cfg.tiers, key)  # validates the model file now; built again by the router
    except TierConfigError as exc:
        raise ConfigError(source, str(exc)) from exc  # the message starts with the key path
    return document


def _port(section: dict[str, Any], where: str, default: int | None) -> int:
    """A TCP port: 1-65535, or 0 for one the OS picks (tests, `tokenyard up --port 0`)."""
    port = get(section, "port", int, where, default=default)
    if port is None or not 0 <= port <= MAX_PORT:
        raise ConfigError(f"{where}.port", f"expected a TCP port 1-{MAX_PORT} (0: any free port), got {port!r}")
    return port


def _check_redis_url(url: str, where: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(where, f"invalid Redis URL {url!r}: {exc}") from None
    if port is not None and not 1 <= port <= MAX_PORT:
        raise ConfigError(where, f"Redis port must be 1-{MAX_PORT}, got {port}")
    db = parts.path.strip("/")
    if db and (not db.isdigit() or int(db) > REDIS_MAX_DB):
        raise ConfigError(where, f"Redis database index must be an integer 0-{REDIS_MAX_DB} "
                                 f"(Redis's default `databases 16`), got {db!r} in {url!r}")


def _apply_document(cfg: RouterConfig, document: PolicyDocument) -> None:
    """The router's view of the document's settings (the old fields, kept for readers)."""
    cfg.slo_classes = document.slo_class_map()
    cfg.policies = {name: document.profile_config(name) for name in document.profiles}
    cfg.default_policy = document.selection.default
    cfg.policy_by_slo_class = dict(document.selection.by_slo_class)
    cfg.max_candidates = document.window.max_candidates
    cfg.forward_priority = document.build_engine_priority().needs_engine_priority
    cfg.affinity_ttl_s = document.affinity.ttl_s


def _parse_old_dialect(cfg: RouterConfig, doc: dict[str, Any], source: str) -> None:
    def at(key: str) -> str:
        return f"{source}: {key}"

    cfg.slo_classes = parse_slo_classes(doc.get("slo_classes"), at("slo_classes"))
    classes = sorted(cfg.slo_classes)

    policies = _section(doc, "policies", source)
    if policies:
        cfg.policies = {}
        for name, body in policies.items():
            where = at(f"policies.{name}")
            if not isinstance(body, dict):
                raise ConfigError(where, "expected a mapping with filters, scorers, picker")
            try:
                build_policy(body, where=where)
            except PolicyConfigError as exc:
                raise ConfigError(where, str(exc).removeprefix(where + ": ")) from exc
            cfg.policies[str(name)] = dict(body)
    policy_names = sorted(cfg.policies)

    dispatch = _section(doc, "dispatch", source)
    check_keys(dispatch, ("default_policy", "by_slo_class", "max_candidates", "forward_priority", "affinity_ttl_s"),
               at("dispatch"))
    cfg.default_policy = get(dispatch, "default_policy", str, at("dispatch"),
                             default=policy_names[0] if "default" not in cfg.policies else "default",
                             choices=policy_names)
    by_class = get(dispatch, "by_slo_class", dict, at("dispatch"), default={})
    for cls_name, policy in by_class.items():
        where = at(f"dispatch.by_slo_class.{cls_name}")
        if cls_name not in cfg.slo_classes:
            raise ConfigError(where, f"unknown SLO class; known: {', '.join(classes)}")
        if policy not in cfg.policies:
            raise ConfigError(where, f"unknown policy {policy!r}; known: {', '.join(policy_names)}")
    cfg.policy_by_slo_class = {str(k): str(v) for k, v in by_class.items()}
    cfg.max_candidates = get(dispatch, "max_candidates", int, at("dispatch"), default=cfg.max_candidates, minimum=0)
    cfg.forward_priority = get(dispatch, "forward_priority", bool, at("dispatch"), default=True)
    cfg.affinity_ttl_s = get(dispatch, "affinity_ttl_s", float, at("dispatch"), default=cfg.affinity_ttl_s, minimum=1)


def _parse_tenants(cfg: RouterConfig, doc: dict[str, Any], source: str, classes: list[str],
                   policy_names: list[str], document: PolicyDocument | None) -> None:
    def at(key: str) -> str:
        return f"{source}: {key}"

    by_tenant = document.selection.by_tenant if document is not None else {}
    tenants = _section(doc, "tenants", source)
    seen_keys: dict[str, str] = {}
    for name, body in tenants.items():
        where = at(f"tenants.{name}")
        if not isinstance(body, dict):
            raise ConfigError(where, "expected a mapping with api_keys and slo_class")
        check_keys(body, ("api_keys", "slo_class", "policy", "retry_budget"), where)
        keys = get(body, "api_keys", list, where)
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{where}.api_keys[{i}]", f"expected a non-empty string, got {key!r}")
            if key in seen_keys:
                raise ConfigError(f"{where}.api_keys[{i}]", f"key already belongs to tenant {seen_keys[key]!r}")
            seen_keys[key] = str(name)
        slo_class = get(body, "slo_class", str, where, default="default", choices=classes)
        policy = (get(body, "policy", str, where, default=None, choices=policy_names) if "policy" in body
                  else by_tenant.get(str(name)))
        budget = body.get("retry_budget") or {}
        if not isinstance(budget, dict):
            raise ConfigError(f"{where}.retry_budget", "expected a mapping {ratio, min_per_s, burst}")
        check_keys(budget, ("ratio", "min_per_s", "burst"), f"{where}.retry_budget")
        cfg.tenants.append(TenantConfig(
            name=str(name), api_keys=list(keys), slo_class=slo_class, policy=policy,
            retry_ratio=get(budget, "ratio", float, f"{where}.retry_budget", default=0.2, minimum=0),
            retry_min_per_s=get(budget, "min_per_s", float, f"{where}.retry_budget", default=5.0, minimum=0),
            retry_burst=get(budget, "burst", float, f"{where}.retry_budget", default=50.0, minimum=1),
        ))

    if "anonymous" in doc:
        anonymous = doc["anonymous"]
        if anonymous is False or anonymous is None:
            cfg.anonymous_slo_class = None
        elif isinstance(anonymous, dict):
            check_keys(anonymous, ("slo_class",), at("anonymous"))
            cfg.anonymous_slo_class = get(anonymous, "slo_class", str, at("anonymous"), default="default",
                                          choices=classes)
        else:
            raise ConfigError(at("anonymous"), f"expected false or {{slo_class: NAME}}, got {anonymous!r}")
    elif seen_keys:
        cfg.anonymous_slo_class = None  # keys configured: a request without one is refused
    elif "default" not in cfg.slo_classes:
        cfg.anonymous_slo_class = classes[0]


def _parse_rest(cfg: RouterConfig, doc: dict[str, Any], source: str, classes: list[str]) -> None:
    def at(key: str) -> str:
        return f"{source}: {key}"

    retries = _section(doc, "retries", source)
    check_keys(retries, ("max_attempts", "connect_timeout_s", "first_byte_timeout_s"), at("retries"))
    cfg.max_attempts = get(retries, "max_attempts", int, at("retries"), default=cfg.max_attempts, minimum=1)
    cfg.connect_timeout_s = get(retries, "connect_timeout_s", float, at("retries"), default=cfg.connect_timeout_s,
                                minimum=0.001)
    if retries.get("first_byte_timeout_s") is not None:
        cfg.first_byte_timeout_s = get(retries, "first_byte_timeout_s", float, at("retries"), minimum=0.001)

    deadlines = _section(doc, "deadlines_ms", source)
    for cls_name in deadlines:
        if cls_name not in cfg.slo_classes:
            raise ConfigError(at(f"deadlines_ms.{cls_name}"), f"unknown SLO class; known: {', '.join(classes)}")
        cfg.deadlines_ms[str(cls_name)] = get(deadlines, cls_name, float, at("deadlines_ms"), minimum=1)

    health = _section(doc, "health", source)
    check_keys(health, ("interval_s", "timeout_s", "eject_after_failures", "eject_s", "max_eject_s"), at("health"))
    h = HealthConfig()
    cfg.health = HealthConfig(
        interval_s=get(health, "interval_s", float, at("health"), default=h.interval_s, minimum=0.01),
        timeout_s=get(health, "timeout_s", float, at("health"), default=h.timeout_s, minimum=0.001),
        eject_after_failures=get(health, "eject_after_failures", int, at("health"), default=h.eject_after_failures,
                                 minimum=1),
        eject_s=get(health, "eject_s", float, at("health"), default=h.eject_s, minimum=0.01),
        max_eject_s=get(health, "max_eject_s", float, at("health"), default=h.max_eject_s, minimum=0.01),
    )

    load = _section(doc, "load", source)
    check_keys(load, ("scrape_interval_s", "timeout_s", "worker_token_file"), at("load"))
    cfg.scrape_interval_s = get(load, "scrape_interval_s", float, at("load"), default=cfg.scrape_interval_s,
                                minimum=0.01)
    cfg.scrape_timeout_s = get(load, "timeout_s", float, at("load"), default=cfg.scrape_timeout_s, minimum=0.001)
    cfg.worker_token_file = get(load, "worker_token_file", str, at("load"), default=None)
    if cfg.worker_token_file is not None:
        from tokenyard.worker_auth import read_worker_token

        cfg.worker_token = read_worker_token(cfg.worker_token_file, at("load.worker_token_file"))

    metrics = _section(doc, "metrics", source)
    check_keys(metrics, ("plugin_sample_every",), at("metrics"))
    cfg.plugin_sample_every = get(metrics, "plugin_sample_every", int, at("metrics"),
                                  default=cfg.plugin_sample_every, minimum=0)

    cfg.discovery = _section(doc, "discovery", source)
    if cfg.discovery:
        from router.discovery import build_discovery

        build_discovery(cfg.discovery, at("discovery"))  # validates now; started by the router

    cfg.tiers = _section(doc, "tiers", source)  # the older top-level section; see _apply_tiers
    if doc.get("rank") is not None:
        from router.rank import parse_rank_section

        cfg.rank = parse_rank_section(doc["rank"], at("rank"))
    from router.records import parse_records_section, rank_log_alias

    cfg.records = parse_records_section(doc.get("records"), at("records"))
    if cfg.rank is not None and cfg.rank.log_path is not None:
        if cfg.records is not None:
            raise ConfigError(at("rank.log"), "the rank log is now the request records: set only records.path "
                                              "(records.include_prompt_text: true keeps the prompt text it logged)")
        log.info("rank.log is an alias of the request records (records.path); see docs/ranking.md",
                 extra={"path": cfg.rank.log_path})
        cfg.records = rank_log_alias(cfg.rank.log_path, cfg.rank.log_max_bytes)


def default_store_url(state_dir: str | Path = ".tokenyard") -> str:
    return "file://" + os.path.abspath(os.path.join(state_dir, "state.json"))


def _section(doc: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}", f"expected a mapping, got {type(value).__name__}")
    return value
