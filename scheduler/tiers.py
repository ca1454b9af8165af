"""Tier decision: which model tier (small or large) answers a request sent to the tier
alias (e.g. `model: auto`), from its predicted p_small_ok, its tenant's quality floor or
cost budget, and the load of the two tiers' pools.

Pure: `TierRouter.decide(request, instances, slo, rng)` reads the request's `p_small_ok`
(scored by `scheduler.predictors.tier`), the instances' load snapshots and a seeded RNG;
the router and the simulator call it the same way before dispatch.

A request goes small when p_small_ok >= threshold. Thresholds come from the held-out
table shipped in the tier model (`ThresholdRow`: threshold -> share of large calls and
PGR, the performance gap recovered), so a policy is written in the units a tenant cares
about:
- `quality_target` (PGR to aim for when capacity allows) or `cost_budget` (largest share
  of large calls) sets the normal threshold;
- `quality_floor` (least PGR ever) sets the lowest threshold load may push it to.

Load-aware routing (`load_aware`): the predicted TTFT of the large tier (its best
instance: `slo_headroom`'s prediction plus the drain time of its queue) against the request's SLO gives a pressure in
[0, 1] (0 below `pressure_start` x SLO, 1 at `pressure_full` x SLO), and so does its
predicted TPOT (the decode step stretched by the prefill its prompt-token arrival rate
takes, `predicted_tpot_s`, between `tpot_start` and `tpot_full` x the TPOT SLO; the
larger pressure counts; `pressure: {tpot: false}` reads TTFT alone); the threshold moves
from the normal one down toward the floor in proportion, so the requests with the
smallest predicted quality loss (highest p_small_ok) move to the small tier first. The
reverse when the small tier saturates: the threshold rises toward 1 (more to large). When
both saturate the normal threshold holds.

`cascade` (documented policy, for non-streaming requests): requests between the floor's
threshold and the normal one go small with `escalate=True`; a driver that runs it sends
the answer through `cascade_escalates` and re-asks the large tier when it fails. No
driver runs cascades yet; the decision and the check are here so both will alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

from scheduler import prefill_rate
from scheduler.policies.slo_headroom import SloHeadroom
from scheduler.prefill_rate import prefill_tokens_per_s
from scheduler.types import InstanceState, RequestInfo, SloClass

ALWAYS_LARGE = 1.0 + 1e-9  # a threshold no score reaches
PREFILL_CHUNK_TOKENS = 512  # prefill cost per token is read at least at this prompt length
MAX_PREFILL_SHARE = 0.95  # of an engine's time: the TPOT stretch stays finite


class TierConfigError(ValueError):
    """A bad `tiers:` section; the message names the key path and what is allowed."""


@dataclass(frozen=True, slots=True)
class ThresholdPoint:
    """One row of the held-out table: route small when p_small_ok >= threshold."""

    threshold: float
    large_share: float
    pgr: float


@dataclass(frozen=True, slots=True)
class TierClassPolicy:
    """A tenant's or SLO class's quality contract (PGR in [0, 1]; budget a share of calls)."""

    quality_target: float | None = None
    cost_budget: float | None = None
    quality_floor: float = 0.0


@dataclass(frozen=True, slots=True)
class TierLoad:
    """Predicted TTFT and TPOT of each tier's best instance (the one under the least
    pressure), in ms (inf: no usable instance), and that instance's pressure in [0, 1]."""

    small_ttft_ms: float
    large_ttft_ms: float
    small_tpot_ms: float = 0.0
    large_tpot_ms: float = 0.0
    small_pressure: float = 0.0
    large_pressure: float = 0.0


@dataclass(frozen=True, slots=True)
class TierChoice:
    tier: str  # "small" or "large"
    model: str
    threshold: float
    reason: str = ""
    escalate: bool = False  # cascade: check the small answer, re-ask large if it fails


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The normal and the floor threshold of one class, from the held-out table."""

    normal: float
    floor: float


def threshold_for_pgr(table: Sequence[ThresholdPoint], pgr: float) -> float:
    """The lowest threshold whose held-out PGR reaches `pgr` (most small calls at that quality)."""
    for row in sorted(table, key=lambda r: r.threshold):
        if row.pgr >= pgr - 1e-9:
            return row.threshold
    return ALWAYS_LARGE


def threshold_for_budget(table: Sequence[ThresholdPoint], large_share: float) -> float:
    """The highest threshold whose held-out share of large calls stays within `large_share`."""
    best = 0.0
    for row in sorted(table, key=lambda r: r.threshold):
        if row.large_share <= large_share + 1e-9:
            best = row.threshold
    return best


def class_thresholds(policy: TierClassPolicy, table: Sequence[ThresholdPoint]) -> Thresholds:
    floor = threshold_for_pgr(table, policy.quality_floor) if policy.quality_floor > 0 else 0.0
    if policy.cost_budget is not None:
        normal = threshold_for_budget(table, policy.cost_budget)
    elif policy.quality_target is not None:
        normal = threshold_for_pgr(table, policy.quality_target)
    else:
        normal = ALWAYS_LARGE
    return Thresholds(normal=max(normal, floor), floor=floor)


def pressure(ttft_ms: float, slo_ms: float, start: float, full: float) -> float:
    """0 while predicted TTFT <= start x SLO, 1 from full x SLO, linear between."""
    return ratio_pressure(ttft_ms / slo_ms, start, full)


def ratio_pressure(ratio: float, start: float, full: float) -> float:
    """0 while a prediction / SLO ratio <= start, 1 from full, linear between."""
    if ratio <= start:
        return 0.0
    if ratio >= full:
        return 1.0
    return (ratio - start) / (full - start)


class TierPolicy:
    """Turns a class's thresholds and the tiers' load into the threshold for this request."""

    name: ClassVar[str] = ""
    reads_load: ClassVar[bool] = True

    def threshold(self, limits: Thresholds, small_pressure: float, large_pressure: float) -> float:
        raise NotImplementedError

    def choose(self, p_small_ok: float, threshold: float, limits: Thresholds, table: Sequence[ThresholdPoint],
               rng: random.Random) -> tuple[bool, bool]:
        """(small?, escalate?) for a request scored `p_small_ok` at `threshold`."""
        return p_small_ok >= threshold, False


TIER_POLICIES: dict[str, type[TierPolicy]] = {}
_T = TypeVar("_T", bound=type[TierPolicy])


def register_tier_policy(name: str) -> Callable[[_T], _T]:
    def wrap(cls: _T) -> _T:
        cls.name = name
        TIER_POLICIES[name] = cls
        return cls

    return wrap


@register_tier_policy("always_large")
class AlwaysLarge(TierPolicy):
    reads_load = False

    def threshold(self, limits: Thresholds, small_pressure: float, large_pressure: float) -> float:
        return ALWAYS_LARGE


@register_tier_policy("always_small")
class AlwaysSmall(TierPolicy):
    reads_load = False

    def threshold(self, limits: Thresholds, small_pressure: float, large_pressure: float) -> float:
        return 0.0


@register_tier_policy("quality_only")
class QualityOnly(TierPolicy):
    """The class's normal threshold whatever the load."""

    reads_load = False

    def threshold(self, limits: Thresholds, small_pressure: float, large_pressure: float) -> float:
        return limits.normal


@register_tier_policy("load_aware")
class LoadAware(TierPolicy):
    """Normal threshold, moved toward the floor by large-tier pressure and toward 1 by
    small-tier pressure (see the module docstring)."""

    def threshold(self, limits: Thresholds, small_pressure: float, large_pressure: float) -> float:
        normal = limits.normal
        down = large_pressure * (1.0 - small_pressure)  # both saturated: neither move
        up = small_pressure * (1.0 - large_pressure)
        value = normal - down * (normal - limits.floor) + up * (ALWAYS_LARGE - normal)
        return max(limits.floor, min(ALWAYS_LARGE, value))


def _small_share(table: Sequence[ThresholdPoint], threshold: float) -> float:
    """Held-out share of small calls at `threshold` (linear between table rows)."""
    rows = sorted(table, key=lambda r: r.threshold)
    if not rows or threshold >= ALWAYS_LARGE - 1e-12:
        return 0.0 if threshold > 1.0 else 1.0
    if threshold <= rows[0].threshold:
        return 1.0 - rows[0].large_share
    for lo, hi in zip(rows, rows[1:], strict=False):
        if threshold <= hi.threshold:
            span = hi.threshold - lo.threshold
            frac = 0.0 if span <= 0 else (threshold - lo.threshold) / span
            return 1.0 - (lo.large_share + frac * (hi.large_share - lo.large_share))
    return 1.0 - rows[-1].large_share


@register_tier_policy("random_offload")
class RandomOffload(LoadAware):
    """The baseline load-aware routing is measured against: the same thresholds, but the
    requests sent small are drawn at random at the share that threshold would send."""

    def choose(self, p_small_ok: float, threshold: float, limits: Thresholds, table: Sequence[ThresholdPoint],
               rng: random.Random) -> tuple[bool, bool]:
        return rng.random() < _small_share(table, threshold), False


@register_tier_policy("cascade")
class Cascade(LoadAware):
    """Load-aware thresholds; requests between the floor's threshold and this one go small
    with escalation (the driver checks the answer with `cascade_escalates`)."""

    def choose(self, p_small_ok: float, threshold: float, limits: Thresholds, table: Sequence[ThresholdPoint],
               rng: random.Random) -> tuple[bool, bool]:
        if p_small_ok >= threshold:
            return True, False
        return (True, True) if p_small_ok >= limits.floor else (False, False)


def cascade_escalates(finish_reason: str | None, output_tokens: int, mean_logprob: float | None,
                      min_mean_logprob: float = -1.0) -> bool:
    """The cheap confidence check of a cascade: escalate a small answer that was cut off,
    is empty, or whose mean token log-probability is below `min_mean_logprob`."""
    if finish_reason == "length" or output_tokens <= 0:
        return True
    return mean_logprob is not None and mean_logprob < min_mean_logprob


@dataclass(slots=True)
class TierRouter:
    """The tier decision for requests that name `alias`; built by `build_tier_router`."""

    alias: str
    small_model: str
    large_model: str
    policy: TierPolicy
    table: tuple[ThresholdPoint, ...]
    by_class: dict[str, Thresholds]
    by_tenant: dict[str, Thresholds] = field(default_factory=dict)
    default: Thresholds = field(default_factory=lambda: Thresholds(ALWAYS_LARGE, 0.0))
    pressure_start: float = 0.6
    pressure_full: float = 1.0
    default_ttft_slo_ms: float = 3000.0
    mean_output_tokens: int = 256  # of the requests queued ahead (drain-time estimate)
    tpot_pressure: bool = True  # the TPOT predicted from the prefill rate counts too
    tpot_start: float = 0.5  # TPOT pressure: 0 below this x the TPOT SLO ...
    tpot_full: float = 1.0  # ... 1 from this
    ttft_model: SloHeadroom = field(default_factory=SloHeadroom)

    def handles(self, model: str) -> bool:
        return model.lower() == self.alias.lower()

    def limits(self, request: RequestInfo) -> Thresholds:
        found = self.by_tenant.get(request.tenant)
        if found is not None:
            return found
        return self.by_class.get(request.slo_class, self.default)

    def load(self, request: RequestInfo, instances: Sequence[InstanceState], slo: SloClass | None = None) -> TierLoad:
        """Predicted TTFT and TPOT (ms) on each tier's best usable instance, the one under
        the least pressure: the larger of the TTFT pressure (TTFT / TTFT SLO between
        `pressure_start` and `pressure_full`) and, with `tpot_pressure`, the TPOT pressure
        (TPOT / TPOT SLO between `tpot_start` and `tpot_full`), at the request's arrival."""
        ttft_slo_ms = slo.ttft_slo_ms if slo is not None else self.default_ttft_slo_ms
        tpot_slo_ms = slo.tpot_slo_ms if slo is not None and self.tpot_pressure else math.inf
        inf = math.inf
        best = {self.small_model.lower(): (1.0, inf, inf), self.large_model.lower(): (1.0, inf, inf)}
        for inst in instances:
            model = inst.model.lower()
            if model not in best or not inst.healthy or inst.draining or inst.cordoned:
                continue
            ttft_ms = 1000.0 * self.predicted_ttft_s(request, inst)
            press = ratio_pressure(ttft_ms / ttft_slo_ms, self.pressure_start, self.pressure_full)
            tpot_ms = 0.0
            if tpot_slo_ms < inf:
                tpot_ms = 1000.0 * self.predicted_tpot_s(request, inst)
                press = max(press, ratio_pressure(tpot_ms / tpot_slo_ms, self.tpot_start, self.tpot_full))
            if (press, ttft_ms) < best[model][:2]:
                best[model] = (press, ttft_ms, tpot_ms)
        small, large = best[self.small_model.lower()], best[self.large_model.lower()]
        return TierLoad(small[1], large[1], small[2], large[2], small[0], large[0])

    def predicted_tpot_s(self, request: RequestInfo, inst: InstanceState) -> float:
        """The decode step of the instance's batch (with this request in it), stretched by
        the share of the engine's time its prompt-token arrivals (this request's prompt
        included, as arriving now) take to prefill: step / (1 - rate x prefill time per
        token), the share capped at 0.95 (scheduler/prefill_rate.py). A prefill-heavy
        stream breaks the TPOT of the requests decoding beside it before any queue forms."""
        model = self.ttft_model.engine_model(inst)
        if model is None:
            return 0.0  # no engine model: no TPOT estimate (TTFT pressure alone)
        seqs = inst.running + 1
        context = seqs * self.ttft_model.context_tokens_per_seq
        step_s = model.iteration_time_s(decode_seqs=seqs, context_tokens=context)
        # The request's own prompt counts as arriving now: it is what this decision would add.
        rate = prefill_tokens_per_s(inst, request.arrival_s) + request.input_tokens / prefill_rate.PREFILL_RATE_TAU_S
        # Prefill time per token: what a chunk of the request's prompt length adds to a decode
        # iteration (the iteration's fixed costs are in the step already).
        chunk = max(request.input_tokens, PREFILL_CHUNK_TOKENS)
        mixed_s = model.iteration_time_s(prefill_tokens=chunk, decode_seqs=seqs, context_tokens=context,
                                         prefill_attention_pairs=chunk * (chunk + 1) / 2.0, prefill_seqs=1)
        busy = rate * max(0.0, mixed_s - step_s) / chunk
        return step_s / (1.0 - min(busy, MAX_PREFILL_SHARE))

    def predicted_ttft_s(self, request: RequestInfo, inst: InstanceState) -> float:
        """`slo_headroom`'s prediction (the next iteration prefills the queue and the
        prompt) plus, when requests wait for a batch slot, the time for running ones to
        finish and free slots for them: waiting x mean output tokens x decode step / running.
        Without the second term a decode-bound engine looks fast until its queue is long."""
        predicted = self.ttft_model.predicted_ttft_s(request, inst)
        waiting = max(inst.waiting, inst.outstanding - inst.running)
        if waiting <= 0 or inst.running <= 0:
            return predicted
        model = self.ttft_model.engine_model(inst)
        if model is None:
            return predicted + waiting * self.ttft_model.unknown_iteration_s
        step_s = model.iteration_time_s(decode_seqs=inst.running,
                                        context_tokens=inst.running * self.ttft_model.context_tokens_per_seq)
        return predicted + waiting * self.mean_output_tokens * step_s / inst.running

    def decide(self, request: RequestInfo, instances: Sequence[InstanceState], slo: SloClass | None,
               rng: random.Random) -> TierChoice:
        limits = self.limits(request)
        small_p = large_p = 0.0
        if self.policy.reads_load:
            load = self.load(request, instances, slo)
            small_p, large_p = load.small_pressure, load.large_pressure
        threshold = self.policy.threshold(limits, small_p, large_p)
        p = request.p_small_ok if request.p_small_ok is not None else 0.0  # unscored: large
        small, escalate = self.policy.choose(p, threshold, limits, self.table, rng)
        reason = f"{self.policy.name}: p_small_ok {p:.3f} vs {threshold:.3f} (pressure small {small_p:.2f}, large {large_p:.2f})"
        return TierChoice("small" if small else "large", self.small_model if small else self.large_model,
                          threshold, reason, escalate)

    def with_policy(self, name: str) -> TierRouter:
        """The same router deciding by another registered policy (for comparisons)."""
        return replace(self, policy=_policy(name, "tiers.policy"))


def _policy(name: Any, where: str) -> TierPolicy:
    cls = TIER_POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise TierConfigError(f"{where}: unknown tier policy {name!r}; known: {', '.join(sorted(TIER_POLICIES))}")
    return cls()


def _share(doc: Mapping[str, Any], key: str, where: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise TierConfigError(f"{where}.{key}: expected a number in [0, 1], got {value!r}")
    return float(value)


def parse_class_policy(doc: Any, where: str) -> TierClassPolicy:
    if not isinstance(doc, Mapping):
        raise TierConfigError(f"{where}: expected a mapping with quality_floor, quality_target or cost_budget")
    unknown = sorted(set(doc) - {"quality_floor", "quality_target", "cost_budget"})
    if unknown:
        raise TierConfigError(f"{where}: unknown key(s) {unknown}; allowed: cost_budget, quality_floor, quality_target")
    target, budget = _share(doc, "quality_target", where), _share(doc, "cost_budget", where)
    if target is not None and budget is not None:
        raise TierConfigError(f"{where}: give quality_target or cost_budget, not both")
    floor = _share(doc, "quality_floor", where) or 0.0
    if target is not None and target < floor:
        raise TierConfigError(f"{where}: quality_target {target} is below quality_floor {floor}")
    return TierClassPolicy(quality_target=target, cost_budget=budget, quality_floor=floor)


TIER_KEYS = ("alias", "small_model", "large_model", "policy", "classes", "tenants", "pressure", "default",
             "mean_output_tokens")


def build_tier_router(doc: Mapping[str, Any], table: Sequence[ThresholdPoint], where: str = "tiers") -> TierRouter:
    """A `TierRouter` from a `tiers:` config section and the tier model's held-out table:

        tiers: {alias: auto, small_model: qwen2.5-1.5b, large_model: llama-3-8b, policy: load_aware,
                pressure: {start: 0.6, full: 1.0},
                default: {quality_target: 0.9, quality_floor: 0.5},
                classes: {batch: {cost_budget: 0.2, quality_floor: 0.3}},
                tenants: {acme: {quality_floor: 0.8, quality_target: 0.95}}}
    """
    if not isinstance(doc, Mapping):
        raise TierConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(doc) - set(TIER_KEYS))
    if unknown:
        raise TierConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(TIER_KEYS)}")
    models = {}
    for key in ("small_model", "large_model"):
        value = doc.get(key)
        if not isinstance(value, str) or not value:
            raise TierConfigError(f"{where}.{key}: expected a model name")
        models[key] = value
    alias = doc.get("alias", "auto")
    if not isinstance(alias, str) or not alias or alias.lower() in (m.lower() for m in models.values()):
        raise TierConfigError(f"{where}.alias: expected a name other than the two models, got {alias!r}")
    rows = tuple(table)
    if not rows:
        raise TierConfigError(f"{where}: the tier model has no threshold table (retrain with `tokenyard train tier`)")
    press = doc.get("pressure") or {}
    if not isinstance(press, Mapping) or set(press) - {"start", "full", "tpot"}:
        raise TierConfigError(f"{where}.pressure: expected {{start, full, tpot}} (multiples of the TTFT SLO; "
                              "tpot: false, or {start, full} in multiples of the TPOT SLO)")
    tpot_doc = press.get("tpot", True)
    tpot_on, tpot_start, tpot_full = True, 0.5, 1.0
    if isinstance(tpot_doc, bool):
        tpot_on = tpot_doc
    elif isinstance(tpot_doc, Mapping) and not set(tpot_doc) - {"start", "full"}:
        tpot_start, tpot_full = float(tpot_doc.get("start", 0.5)), float(tpot_doc.get("full", 1.0))
        if not 0.0 <= tpot_start < tpot_full:
            raise TierConfigError(f"{where}.pressure.tpot: expected 0 <= start < full, got start {tpot_start}, "
                                  f"full {tpot_full}")
    else:
        raise TierConfigError(f"{where}.pressure.tpot: expected true, false or {{start, full}} (multiples of the "
                              f"TPOT SLO), got {tpot_doc!r}")
    start, full = float(press.get("start", 0.6)), float(press.get("full", 1.0))
    if not 0.0 <= start < full:
        raise TierConfigError(f"{where}.pressure: expected 0 <= start < full, got start {start}, full {full}")

    def section(key: str) -> dict[str, Thresholds]:
        body = doc.get(key) or {}
        if not isinstance(body, Mapping):
            raise TierConfigError(f"{where}.{key}: expected a mapping of name -> policy")
        return {str(n): class_thresholds(parse_class_policy(p, f"{where}.{key}.{n}"), rows) for n, p in body.items()}

    mean_output = doc.get("mean_output_tokens", 256)
    if isinstance(mean_output, bool) or not isinstance(mean_output, int) or not 1 <= mean_output <= 1_000_000:
        raise TierConfigError(f"{where}.mean_output_tokens: expected an integer in [1, 1000000], got {mean_output!r}")
    default_doc = doc.get("default")
    default = (class_thresholds(parse_class_policy(default_doc, f"{where}.default"), rows)
               if default_doc is not None else Thresholds(ALWAYS_LARGE, 0.0))
    return TierRouter(
        alias=alias, small_model=models["small_model"], large_model=models["large_model"],
        policy=_policy(doc.get("policy", "load_aware"), f"{where}.policy"), table=rows,
        by_class=section("classes"), by_tenant=section("tenants"), default=default,
        pressure_start=start, pressure_full=full, mean_output_tokens=mean_output, tpot_pressure=tpot_on,
        tpot_start=tpot_start, tpot_full=tpot_full,
    )
