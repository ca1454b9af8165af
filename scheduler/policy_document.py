"""The policy document: every decision setting the router, the simulator and the admin API
share, one schema, one loader.

    version: 1
    seed: 0                          # seeds every profile's RNG (window draws, random pickers)
    slo_classes:
      interactive: {ttft_ms: 1000, tpot_ms: 100, priority: 0, queue_timeout_ms: 5000}
      batch: {ttft_ms: 60000, tpot_ms: 1000, priority: 2, sheddable: true}
    profiles:                        # dispatch profiles: filter -> score -> pick
      default: {filters: [model, healthy, not_draining, not_cordoned], scorers: [least_outstanding], picker: max_score}
      headroom: {scorers: [slo_headroom, {least_outstanding: {weight: 0.1}}]}
    selection: {default: default, by_slo_class: {interactive: headroom}, by_tenant: {acme: headroom}}
    window: {max_candidates: 16}     # score at most this many instances of a model (0: all)
    affinity: {enabled: true, ttl_s: 600}   # session affinity, keyed per tenant
    queue: {sort: fcfs, engine_priority: fcfs}
    admission: {enabled: false, max_queue_depth: 1024, default_queue_timeout_ms: 10000,
                retry_after_s: 1, saturation: {max_queued_per_instance: 8}}
    migration: {enabled: true, policy: llumnix, interval_s: 0.5, link_gbps: 100,
                params: {preempt_guard_blocks: 8, destination_reserve_blocks: 16}}   # live migration
    tiers: {alias: auto, small_model: qwen2.5-1.5b, large_model: llama-3-8b,   # optional
            policy: load_aware, default: {quality_target: 0.9, quality_floor: 0.5}}

`load_policy_document(mapping)` validates it (pydantic models, then each part against its
typed parameters) and raises `PolicyDocumentError` naming the key path, the value and what
is allowed; `PolicyDocument.to_dict()` gives a mapping that loads back to an equal
document. Pure: reading files is the caller's (tokenyard/config.py `load_yaml`).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from scheduler.dispatch import DispatchPolicy, build_policy, format_validation_error
from scheduler.dispatch_parts import PolicyConfigError
from scheduler.migration import (
    MIGRATION_POLICIES,
    RETIRED_PARAMS,
    MigrationPolicy,
    MigrationPolicyError,
    build_migration_policy,
)
from scheduler.queue_orders import build_queue_policy, build_queue_sort
from scheduler.queueing import QueuePolicy, QueuePolicyError, QueueSort
from scheduler.tier_document import TiersSpec, check_tiers
from scheduler.types import SloClass

DOCUMENT_VERSION = 1
DEFAULT_FILTERS: tuple[str, ...] = ("model", "healthy", "not_draining", "not_cordoned")

PartSpec = str | dict[str, dict[str, Any] | None]


class PolicyDocumentError(ValueError):
    """The document is invalid; the message is one line: `key.path: problem (got value)`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SloClassSpec(_Strict):
    """Targets and handling of one SLO class."""

    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
    priority: int = 0
    sheddable: bool = False
    queue_timeout_ms: float | None = Field(default=None, gt=0)
    stall_timeout_ms: float | None = Field(default=None, gt=0)


DEFAULT_SLO_CLASS_SPECS: dict[str, SloClassSpec] = {
    "interactive": SloClassSpec(ttft_ms=1000.0, tpot_ms=100.0, priority=0),
    "default": SloClassSpec(ttft_ms=3000.0, tpot_ms=200.0, priority=1),
    "batch": SloClassSpec(ttft_ms=60000.0, tpot_ms=1000.0, priority=2),
}


def _parts(*names: str) -> list[PartSpec]:
    return list(names)


class ProfileSpec(_Strict):
    """One dispatch profile (scheduler.dispatch.build_policy)."""

    filters: list[PartSpec] = Field(default_factory=lambda: _parts(*DEFAULT_FILTERS))
    scorers: list[PartSpec] = Field(default_factory=lambda: _parts("least_outstanding"))
    picker: PartSpec = "max_score"
    seed: int | None = None


class SelectionSpec(_Strict):
    """Which profile decides a request: its tenant's, else its SLO class's, else `default`."""

    default: str = "default"
    by_slo_class: dict[str, str] = Field(default_factory=dict)
    by_tenant: dict[str, str] = Field(default_factory=dict)


class WindowSpec(_Strict):
    """Above `max_candidates` instances of a model, score a window of that many at an offset
    drawn from the profile's seeded RNG (0: score every instance)."""

    max_candidates: int = Field(default=16, ge=0)


class AffinitySpec(_Strict):
    """Session affinity (tenant + session id -> instance), in the shared store live and in
    memory simulated."""

    enabled: bool = True
    ttl_s: float = Field(default=600.0, ge=1)


class QueueSpec(_Strict):
    """`sort`: the admission queue's release order (scheduler.queueing.QUEUE_SORTS);
    `engine_priority`: the priority forwarded to engines (QUEUE_POLICIES)."""

    sort: PartSpec = "fcfs"
    engine_priority: PartSpec = "fcfs"


class SaturationSpec(_Strict):
    """When an instance counts as saturated; unset criteria are not checked. A model's
    instances are saturated when every usable one is."""

    max_queued_per_instance: int | None = Field(default=8, ge=0)
    max_outstanding_per_instance: int | None = Field(default=None, ge=1)
    max_kv_usage: float | None = Field(default=None, gt=0, le=1)
    max_predicted_ttft_ratio: float | None = Field(default=None, gt=0)


class AdmissionSpec(_Strict):
    """The driver-side admission queue (flow control)."""

    enabled: bool = False
    max_queue_depth: int = Field(default=1024, ge=0)
    default_queue_timeout_ms: float = Field(default=10000.0, gt=0)
    retry_after_s: float = Field(default=1.0, ge=0)
    saturation: SaturationSpec = Field(default_factory=SaturationSpec)
    # Per SLO class, criteria that replace `saturation` for its requests: engines that run
    # priority scheduling serve a high-priority request ahead of their queue, so holding it
    # back at the same depth as batch only adds its wait.
    saturation_by_slo_class: dict[str, SaturationSpec] = Field(default_factory=dict)
    # Scale-from-zero: a model whose instances are all unhealthy or draining (a pool the
    # autoscaler scaled to zero, its first instance still starting) counts as saturated,
    # so its requests wait here (max_queue_depth, the class's queue timeout) until one is
    # up instead of failing at once. Off: they get 503 "no instance" at once.
    hold_until_ready: bool = False


class MigrationParamsSpec(_Strict):
    """Typed parameters of the `llumnix` migration policy (scheduler.migration.BlockedHeadRelief).
    The retired `overload_usage` / `underload_usage` are refused with a hint
    (`_check_retired_migration_params`)."""

    preempt_guard_blocks: int = Field(default=8, ge=0)
    destination_reserve_blocks: int = Field(default=16, ge=0)
    min_usage_gap: float = Field(default=0.0, ge=0, le=10)
    priority_headroom_blocks: int = Field(default=0, ge=0)
    high_priority_below: int = 0
    max_context_tokens: int = Field(default=32_768, ge=0)
    grow_room_blocks: int = Field(default=4, ge=0)
    guard_blocks_per_decode: float = Field(default=1.0, ge=0, le=10)


class MigrationSpec(_Strict):
    """Live migration of running requests (docs/migration.md): the router's loop
    (router/migration_loop.py) and the simulator's driver (sim/migration.py) run `policy`
    every `interval_s` when `enabled`; `link_gbps` is the simulator's KV transfer link."""

    enabled: bool = False
    policy: str = "llumnix"  # a registered name (scheduler.migration.MIGRATION_POLICIES)
    interval_s: float = Field(default=0.5, gt=0, le=3600)
    link_gbps: float = Field(default=100.0, gt=0, le=100_000)
    params: MigrationParamsSpec = Field(default_factory=MigrationParamsSpec)

    def active(self) -> bool:
        """Whether a driver should run a migration loop at all."""
        return self.enabled and self.policy != "none"

    def build_policy(self) -> MigrationPolicy:
        config: dict[str, Any] = {"policy": self.policy}
        if self.policy == "llumnix":  # the typed params are llumnix's; other policies take none
            config.update(self.params.model_dump())
        return build_migration_policy(config)


class PolicyDocument(_Strict):
    """The validated document; build runtime objects with `DecisionLayer` (scheduler.layer)."""

    version: Literal[1] = 1
    seed: int = 0
    slo_classes: dict[str, SloClassSpec] = Field(default_factory=lambda: dict(DEFAULT_SLO_CLASS_SPECS))
    profiles: dict[str, ProfileSpec] = Field(default_factory=lambda: {"default": ProfileSpec()})
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    window: WindowSpec = Field(default_factory=WindowSpec)
    affinity: AffinitySpec = Field(default_factory=AffinitySpec)
    queue: QueueSpec = Field(default_factory=QueueSpec)
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec)
    migration: MigrationSpec = Field(default_factory=MigrationSpec)
    tiers: TiersSpec | None = None  # the model tier alias (scheduler.tier_document)

    def to_dict(self, minimal: bool = False) -> dict[str, Any]:
        """Plain values (JSON/YAML-ready) that `load_policy_document` reads back as equal;
        `minimal` leaves out every value equal to its default (what a person writes)."""
        return self.model_dump(mode="json", exclude_defaults=minimal)

    def slo_class_map(self) -> dict[str, SloClass]:
        return {
            name: SloClass(name, spec.ttft_ms, spec.tpot_ms, spec.priority, spec.sheddable,
                           spec.queue_timeout_ms, spec.stall_timeout_ms)
            for name, spec in self.slo_classes.items()
        }

    def profile_config(self, name: str) -> dict[str, Any]:
        """`build_policy` config of a profile, `slo_headroom` given the document's TTFT
        targets and `least_virtual_usage` the migration section's priority headroom
        (`priority_headroom_blocks`, `high_priority_below`: dispatch and migration balance
        one measure, scheduler/priority_headroom.py), unless the profile names its own."""
        spec = self.profiles[name]
        given: dict[str, dict[str, Any]] = {
            "slo_headroom": {"ttft_slo_ms": {cls: c.ttft_ms for cls, c in self.slo_classes.items()}},
            "least_virtual_usage": {"priority_headroom_blocks": self.migration.params.priority_headroom_blocks,
                                    "high_priority_below": self.migration.params.high_priority_below},
        }
        scorers: list[Any] = []
        for part in spec.scorers:
            if isinstance(part, str) and part in given:
                part = {part: {}}
            if isinstance(part, dict) and len(part) == 1:
                (scorer, raw), = part.items()
                if scorer in given and (raw is None or isinstance(raw, Mapping)):
                    part = {scorer: {**given[scorer], **(raw or {})}}
            scorers.append(part)
        config: dict[str, Any] = {"filters": list(spec.filters), "scorers": scorers, "picker": spec.picker}
        if spec.seed is not None:
            config["seed"] = spec.seed
        return config

    def build_profiles(self, seed: int | None = None) -> dict[str, DispatchPolicy]:
        base = self.seed if seed is None else seed
        return {
            name: build_policy(self.profile_config(name), where=f"profiles.{name}", seed=base, name=name)
            for name in self.profiles
        }

    def build_queue_sort(self) -> QueueSort:
        return build_queue_sort(self.queue.sort, where="queue.sort")

    def build_engine_priority(self) -> QueuePolicy:
        return build_queue_policy(self.queue.engine_priority, where="queue.engine_priority")

    def profile_for(self, tenant: str, slo_class: str) -> str:
        selection = self.selection
        found = selection.by_tenant.get(tenant)
        if found is None:
            found = selection.by_slo_class.get(slo_class, selection.default)
        return found

    def with_profile(self, config: Mapping[str, Any]) -> PolicyDocument:
        """This document with one profile, `default`, from `config`, used for every request
        (a policy comparison's preset)."""
        raw = self.to_dict()
        raw["profiles"] = {"default": dict(config)}
        raw["selection"] = {"default": "default"}
        return load_policy_document(raw)


def load_policy_document(raw: Mapping[str, Any] | PolicyDocument | None, where: str = "policy") -> PolicyDocument:
    """Validate a policy document (a parsed mapping); `where` prefixes every error path."""
    if isinstance(raw, PolicyDocument):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PolicyDocumentError(
            f"{where or 'policy'}: expected a mapping (the policy document), got {type(raw).__name__}"
        )
    _check_retired_migration_params(raw, where)
    try:
        doc = PolicyDocument.model_validate(dict(raw))
    except pydantic.ValidationError as exc:
        raise PolicyDocumentError(_with_allowed(format_validation_error(exc, where), exc)) from None
    _check_references(doc, where)
    return doc


def _check_retired_migration_params(raw: Mapping[str, Any], where: str) -> None:
    """A document written for the usage-balancing migration policy (before issue 13's
    rewrite) names parameters that no longer exist: say what replaced them."""
    section = raw.get("migration")
    params = section.get("params") if isinstance(section, Mapping) else None
    if not isinstance(params, Mapping):
        return
    for name, hint in RETIRED_PARAMS.items():
        if name in params:
            raise PolicyDocumentError(
                f"{_at(where)}migration.params.{name}: retired ({hint}); set preempt_guard_blocks, "
                f"destination_reserve_blocks and min_usage_gap instead (docs/migration.md) (got {params[name]!r})")


def _with_allowed(message: str, exc: pydantic.ValidationError) -> str:
    """Name the allowed keys of the section an unknown key was found in."""
    first = exc.errors(include_url=False)[0]
    if first["type"] != "extra_forbidden":
        return message
    model: type[BaseModel] = PolicyDocument
    skip_key = False  # the next path part is a key of a {name: section} mapping
    for part in first["loc"][:-1]:
        if skip_key:
            skip_key = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return message
        annotation = _unwrap_optional(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        args = get_args(annotation)
        if get_origin(annotation) is dict and len(args) == 2 and isinstance(args[1], type) \
                and issubclass(args[1], BaseModel):
            model, skip_key = args[1], True
            continue
        return message
    return message.replace("unknown key", f"unknown key; allowed: {', '.join(model.model_fields)}", 1)


def _unwrap_optional(annotation: Any) -> Any:
    """`Spec | None` -> `Spec` (an optional section), anything else unchanged."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _at(where: str) -> str:
    """The prefix of a key path under `where` ("" at the top)."""
    return f"{where}." if where else ""


def _check_references(doc: PolicyDocument, where: str) -> None:
    profiles = sorted(doc.profiles)
    classes = sorted(doc.slo_classes)
    if not profiles:
        raise PolicyDocumentError(f"{_at(where)}profiles: expected at least one dispatch profile")
    if not classes:
        raise PolicyDocumentError(f"{_at(where)}slo_classes: expected at least one SLO class")
    sel = doc.selection
    if sel.default not in doc.profiles:
        raise PolicyDocumentError(
            f"{_at(where)}selection.default: unknown profile {sel.default!r}; known: {', '.join(profiles)}"
        )
    for cls, profile in sel.by_slo_class.items():
        if cls not in doc.slo_classes:
            raise PolicyDocumentError(
                f"{_at(where)}selection.by_slo_class.{cls}: unknown SLO class; known: {', '.join(classes)}"
            )
        if profile not in doc.profiles:
            raise PolicyDocumentError(
                f"{_at(where)}selection.by_slo_class.{cls}: unknown profile {profile!r}; known: {', '.join(profiles)}"
            )
    for tenant, profile in sel.by_tenant.items():
        if profile not in doc.profiles:
            raise PolicyDocumentError(
                f"{_at(where)}selection.by_tenant.{tenant}: unknown profile {profile!r}; known: {', '.join(profiles)}"
            )
    for name in doc.profiles:
        try:
            build_policy(doc.profile_config(name), where=f"{_at(where)}profiles.{name}")
        except PolicyConfigError as exc:
            raise PolicyDocumentError(str(exc)) from None
    if doc.tiers is not None:
        problem = check_tiers(doc.tiers, f"{_at(where)}tiers")
        if problem is not None:
            raise PolicyDocumentError(problem)
    for cls in doc.admission.saturation_by_slo_class:
        if cls not in doc.slo_classes:
            raise PolicyDocumentError(
                f"{_at(where)}admission.saturation_by_slo_class.{cls}: unknown SLO class; known: {', '.join(classes)}"
            )
    for key, build in (("sort", build_queue_sort), ("engine_priority", build_queue_policy)):
        try:
            build(getattr(doc.queue, key), where=f"{_at(where)}queue.{key}")
        except QueuePolicyError as exc:
            raise PolicyDocumentError(str(exc)) from None
    if doc.migration.policy not in MIGRATION_POLICIES:
        raise PolicyDocumentError(f"{_at(where)}migration.policy: unknown {doc.migration.policy!r}; "
                                  f"allowed: {', '.join(sorted(MIGRATION_POLICIES))}")
    try:
        doc.migration.build_policy()
    except MigrationPolicyError as exc:  # the policy's own checks
        raise PolicyDocumentError(f"{_at(where)}{exc}") from None
    if doc.tiers is not None:
        problem = check_tiers(doc.tiers, f"{_at(where)}tiers")
        if problem is not None:
            raise PolicyDocumentError(problem)
