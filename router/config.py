"""The router's config file (`tokenyard router --config router.yaml`), validated up front.

Every error names the file, the key path and what was expected (tokenyard/config.py);
nothing starts from a file that failed to validate. Shape, all keys optional:

    listen: {host: 127.0.0.1, port: 8000}
    store: file:///abs/path/state.json      # or redis://host:6379/0?prefix=ty
    control: {host: 127.0.0.1, port: 50051} # gRPC Admin + Picker services
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
    load: {scrape_interval_s: 0.25, timeout_s: 1}
    discovery: {static: [{url: http://127.0.0.1:8001, model: llama-3-8b, gpu: A100-80GB}]}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.dispatch import PolicyConfigError, build_policy
from scheduler.types import SloClass
from tokenyard.config import ConfigError, check_keys, get, load_yaml, parse_slo_classes

DEFAULT_POLICY: dict[str, Any] = {"filters": ["model", "healthy", "not_draining"], "scorers": ["least_outstanding"]}
TOP_KEYS = ("listen", "store", "control", "limits", "slo_classes", "tenants", "anonymous", "policies",
            "dispatch", "retries", "deadlines_ms", "health", "load", "discovery", "rank")


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
    store_url: str | None = None
    control_host: str | None = None
    control_port: int | None = None
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
    discovery: dict[str, Any] = field(default_factory=dict)
    rank: Any = None  # router.rank.RankSettings: the output-length ranker; None = off

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


def load_router_config(path: str | Path) -> RouterConfig:
    return parse_router_config(load_yaml(path), str(path))


def parse_router_config(doc: dict[str, Any], source: str = "<config>") -> RouterConfig:
    """Validate a router config document; `source` prefixes every error's key path."""

    def at(key: str) -> str:
        return f"{source}: {key}"

    check_keys(doc, TOP_KEYS, source)
    cfg = RouterConfig(source=source)

    listen = _section(doc, "listen", source)
    check_keys(listen, ("host", "port"), at("listen"))
    cfg.host = get(listen, "host", str, at("listen"), default=cfg.host)
    cfg.port = get(listen, "port", int, at("listen"), default=cfg.port, minimum=0)

    if "store" in doc:
        store = get(doc, "store", str, source)
        if not store.startswith(("file://", "redis://", "rediss://")):
            raise ConfigError(at("store"), f"expected file:///abs/path.json or redis://host:port/db, got {store!r}")
        cfg.store_url = store

    control = _section(doc, "control", source)
    if control:
        check_keys(control, ("host", "port"), at("control"))
        cfg.control_host = get(control, "host", str, at("control"), default="127.0.0.1")
        cfg.control_port = get(control, "port", int, at("control"), minimum=0)

    limits = _section(doc, "limits", source)
    check_keys(limits, ("max_request_bytes",), at("limits"))
    cfg.max_request_bytes = get(limits, "max_request_bytes", int, at("limits"), default=cfg.max_request_bytes, minimum=1)

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
        policy = get(body, "policy", str, where, default=None, choices=policy_names) if "policy" in body else None
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
    check_keys(load, ("scrape_interval_s", "timeout_s"), at("load"))
    cfg.scrape_interval_s = get(load, "scrape_interval_s", float, at("load"), default=cfg.scrape_interval_s,
                                minimum=0.01)
    cfg.scrape_timeout_s = get(load, "timeout_s", float, at("load"), default=cfg.scrape_timeout_s, minimum=0.001)

    cfg.discovery = _section(doc, "discovery", source)
    if cfg.discovery:
        from router.discovery import build_discovery

        build_discovery(cfg.discovery, at("discovery"))  # validates now; started by the router
    if doc.get("rank") is not None:
        from router.rank import parse_rank_section

        cfg.rank = parse_rank_section(doc["rank"], at("rank"))
    return cfg


def default_store_url(state_dir: str | Path = ".tokenyard") -> str:
    return "file://" + os.path.abspath(os.path.join(state_dir, "state.json"))


def _section(doc: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}", f"expected a mapping, got {type(value).__name__}")
    return value
