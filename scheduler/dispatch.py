"""Dispatch extension points: filter -> score -> pick, each a small class registered by name.

A `DispatchPolicy` is assembled from config (names and parameters) and answers
`decide(view, request) -> Decision`. Drivers (router, simulator) call exactly this and
report outcomes back through `on_dispatch` / `on_finish`, so stateful policies
(round-robin, affinity tables) see the same events live and simulated.

A new policy is one new module in `scheduler/policies/` that registers itself with the
decorators of `scheduler.dispatch_parts` (where the part base classes and the registry live):

    @register_scorer("least_outstanding")
    class LeastOutstanding(Scorer): ...

The plugin contract (docs/plugins.md): a scorer returns a value in [0, 1] (higher is
better; one that does not promise it, `normalized = False`, is clamped), so a weight means
the same for every pair of scorers; a part's parameters are typed (its `Params` class, by
default derived from its `__init__` signature) and validated before it is built;
`register_builtins()` registers the built-ins and every out-of-tree plugin of the
`tokenyard.policies` entry-point group; a `PluginObserver` gets each part's latency; a
decision asked to explain itself carries every candidate's score per scorer.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, TypeVar, get_type_hints

import pydantic

from scheduler.dispatch_parts import (
    FILTERS,
    PICKERS,
    SCORERS,
    DispatchContext,
    Filter,
    Picker,
    PolicyConfigError,
    Scorer,
    register_filter,
    register_picker,
    register_scorer,
)
from scheduler.types import (
    Decision,
    Explanation,
    InstanceState,
    NoInstanceAvailable,
    RankedScores,
    RequestInfo,
)

log = logging.getLogger(__name__)

# The plugin contract of docs/plugins.md stays importable from here for out-of-tree plugins
# written against it; in-tree code imports it from `scheduler.dispatch_parts`.
__all__ = [
    "ENTRY_POINT_GROUP",
    "FILTERS",
    "PICKERS",
    "SCORERS",
    "ClusterView",
    "DispatchContext",
    "DispatchPolicy",
    "Filter",
    "Picker",
    "PluginObserver",
    "PolicyConfigError",
    "Scorer",
    "build_policy",
    "check_params",
    "clamp_unit",
    "format_validation_error",
    "params_model",
    "register_builtins",
    "register_filter",
    "register_picker",
    "register_scorer",
]

ENTRY_POINT_GROUP = "tokenyard.policies"

try:  # see scheduler/dispatch_parts.py
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - mypy is a dev dependency
    from scheduler.dispatch_parts import _no_mypyc_attr as mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class ClusterView:
    """Everything a dispatch decision may look at: instances and the driver's clock."""

    instances: Sequence[InstanceState]
    now_s: float = 0.0
    # A counter the driver bumps whenever an instance joins, leaves, or changes its model,
    # health, draining or cordoned flag, keeping the same `instances` object otherwise; with it set,
    # the result of the leading `static` filters is reused between decisions. None: the
    # driver promises nothing (filters run every time).
    membership_version: int | None = None


class PluginObserver(Protocol):
    """What a driver hands a policy to see each part's latency (its metrics, not ours:
    scheduler/ holds no clock and no metrics library)."""

    def sample(self) -> bool:
        """Whether to time this decision (a driver may time one in N: timing costs)."""
        ...

    def clock_s(self) -> float: ...

    def observe(self, kind: str, name: str, seconds: float) -> None: ...


_builtins_loaded = False
_entry_points_scanned = False
_entry_points_loaded: dict[str, str] = {}  # entry point name -> "module:attr" loaded


def register_builtins(entry_points: bool = True, refresh: bool = True) -> dict[str, str]:
    """Register the built-in parts (importing `scheduler.policies`) and, with `entry_points`,
    every out-of-tree plugin of the `tokenyard.policies` entry-point group: each entry point
    names a module (importing it registers its parts) or a callable (called once). Returns
    the entry points loaded so far (name -> value). A plugin that fails to load is an error
    naming it: a policy document that names its parts must not silently lose them.

    `refresh=False` scans the installed packages only the first time: the scan reads every
    distribution's metadata (~5 ms here, most of building a policy), so `build_policy`
    does it once per process; an explicit call rescans (a package installed since)."""
    global _builtins_loaded, _entry_points_scanned
    if not _builtins_loaded:
        import scheduler.policies  # noqa: F401

        _builtins_loaded = True
    if entry_points and (refresh or not _entry_points_scanned):
        _entry_points_scanned = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if _entry_points_loaded.get(ep.name) == ep.value:
                continue
            try:
                loaded = ep.load()
            except Exception as exc:
                raise PolicyConfigError(
                    f"plugin {ep.name!r} ({ep.value}) of entry-point group {ENTRY_POINT_GROUP} failed to load: {exc}"
                ) from exc
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
            _entry_points_loaded[ep.name] = ep.value
    return dict(_entry_points_loaded)


def _load_builtin_policies() -> None:
    register_builtins(refresh=False)


_PARAM_MODELS: dict[type[Any], type[pydantic.BaseModel]] = {}


def params_model(cls: type[Any]) -> type[pydantic.BaseModel]:
    """The typed parameter class of a part: its `Params` (a pydantic model) when it declares
    one, else a model derived from its `__init__` signature (each parameter's annotation and
    default; unknown keys are refused; names in the part's `internal_params` are for code,
    not config)."""
    declared = cls.__dict__.get("Params")
    if isinstance(declared, type) and issubclass(declared, pydantic.BaseModel):
        return declared
    found = _PARAM_MODELS.get(cls)
    if found is not None:
        return found
    fields: dict[str, Any] = {}
    init = cls.__init__
    if init not in (Filter.__init__, Scorer.__init__, Picker.__init__):
        hints = get_type_hints(init)
        internal = getattr(cls, "internal_params", ())
        for pname, param in inspect.signature(init).parameters.items():
            if pname == "self" or pname in internal or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            annotation = hints.get(pname, Any)
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (annotation, default)
    model = pydantic.create_model(
        f"{cls.__name__}Params",
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False),
        **fields,
    )
    _PARAM_MODELS[cls] = model
    return model  # type: ignore[no-any-return]


def check_params(cls: type[Any], params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`params` validated against the part's typed parameter class; the error names the
    key path, the value and what is allowed."""
    model = params_model(cls)
    try:
        validated = model.model_validate(dict(params))
    except pydantic.ValidationError as exc:
        raise PolicyConfigError(format_validation_error(exc, where, allowed=sorted(model.model_fields))) from None
    return {name: getattr(validated, name) for name in params}


def format_validation_error(
    exc: pydantic.ValidationError, where: str, allowed: Sequence[str] | None = None
) -> str:
    """One line: `where.key.path: what is wrong (got VALUE)`, the first error, plus a count."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in first["loc"]).replace(".[", "[")
    full = f"{where}.{path}" if path and where else (path or where)
    message = str(first["msg"])
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        if allowed is not None:
            message += f"; allowed: {', '.join(allowed) or 'none (the part takes no parameters)'}"
    text = f"{full}: {message}"
    if first["type"] != "missing":
        text += f" (got {first['input']!r})"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error(s))"
    return text


# Compiled in the router's --native build (router/native.py); plugins and tests subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class DispatchPolicy:
    """filter -> score -> pick, assembled from registered parts."""

    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    seed: int = 0
    name: str = ""  # the profile's name in the policy document
    observer: PluginObserver | None = None  # each part's latency, when the driver wants it
    rng: random.Random = field(init=False)
    # (instances object, membership version, model, filters) -> candidates after the
    # leading static filters; the instances object is held so that its id is not reused.
    _static_kept: tuple[object, int, str, tuple[Filter, ...], list[InstanceState]] | None = field(
        init=False, default=None, repr=False
    )

    # (the cached candidate list, its instance ids) while ctx.candidates_stable holds
    _stable_ids: tuple[object, list[str]] = field(init=False, default=(None, []), repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def all_normalized(self) -> bool:
        # A plain loop: asked on every decision, and all() over a generator costs a frame.
        for scorer, _ in self.scorers:  # noqa: SIM110
            if not scorer.normalized:
                return False
        return True

    def _run_filters(
        self, view: ClusterView, request: RequestInfo, ctx: DispatchContext,
        observer: PluginObserver | None = None,
    ) -> list[InstanceState]:
        filters = self.filters
        first = 0
        version = view.membership_version
        cached: list[InstanceState] | None = None
        if version is not None:
            while first < len(filters) and filters[first].static:
                first += 1
            if first:
                hit = self._static_kept
                if (
                    hit is not None
                    and hit[0] is view.instances
                    and hit[1] == version
                    and hit[2] == request.model
                    and hit[3] == tuple(filters[:first])
                ):
                    cached = hit[4]
        if cached is None:
            candidates = list(view.instances)
            if not candidates:
                raise NoInstanceAvailable(f"request {request.request_id}: no instances registered")
            start = 0
        else:
            candidates = cached
            start = first
            ctx.candidates_stable = start == len(filters)
        for k in range(start, len(filters)):
            flt = filters[k]
            if observer is None:
                kept = flt.keep_all(request, candidates, ctx)
            else:
                t0 = observer.clock_s()
                kept = flt.keep_all(request, candidates, ctx)
                observer.observe("filter", flt.name, observer.clock_s() - t0)
            if not kept:
                raise NoInstanceAvailable(
                    f"request {request.request_id} (model {request.model!r}): filter {flt.name!r} "
                    f"removed the last {len(candidates)} candidate(s)"
                )
            candidates = kept
            if k + 1 == first and version is not None:
                self._static_kept = (view.instances, version, request.model, tuple(filters[:first]), candidates)
        return candidates

    def decide(self, view: ClusterView, request: RequestInfo, explain: bool = False) -> Decision:
        """Filter, score and order `view.instances` for `request`.

        Each part is called once per decision on the whole candidate list (`keep_all`,
        `score_all`, `rank`), not once per instance: on a 64-instance fleet the per-instance
        calls were most of a decision's cost. The result is the one the per-instance
        methods define (tests/test_policies.py compares both on random clusters).
        `explain`: the decision carries each candidate's score per scorer (`Explanation`)."""
        ctx = DispatchContext(view.now_s, self.rng)
        observer = self.observer
        if observer is not None and not observer.sample():
            observer = None
        candidates = self._run_filters(view, request, ctx, observer)
        if explain or observer is not None or not self.all_normalized:
            return self._decide_observed(request, candidates, ctx, explain, len(view.instances), observer)
        scorers = self.scorers
        if len(scorers) == 1:
            scorer, weight = scorers[0]
            # 0.0 + w * s, as the sum below gives (it turns a -0.0 score into 0.0); 1.0 * s is s.
            if weight == 1.0:
                totals = [0.0 + s for s in scorer.score_all(request, candidates, ctx)]
            else:
                totals = [0.0 + weight * s for s in scorer.score_all(request, candidates, ctx)]
        else:
            totals = [0.0] * len(candidates)
            for scorer, weight in scorers:
                totals = [t + weight * s for t, s in zip(totals, scorer.score_all(request, candidates, ctx), strict=True)]
        order = self.picker.rank(request, candidates, totals, ctx)
        if ctx.candidates_stable and self._stable_ids[0] is candidates:
            ids = self._stable_ids[1]
        else:
            ids = [inst.instance_id for inst in candidates]
            if ctx.candidates_stable:
                self._stable_ids = (candidates, ids)
        return Decision(
            instance_ids=tuple(map(ids.__getitem__, order)),
            reason=self.picker.name,
            scores=RankedScores(ids, totals, order),
        )

    def _decide_observed(
        self, request: RequestInfo, candidates: list[InstanceState], ctx: DispatchContext, explain: bool,
        window: int, observer: PluginObserver | None,
    ) -> Decision:
        """`decide` after the filters, timing each part for the observer, clamping scores of
        scorers that do not promise [0, 1], and keeping the per-scorer scores to explain."""
        per_scorer: list[list[float]] = []
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            t0 = observer.clock_s() if observer is not None else 0.0
            raw = scorer.score_all(request, candidates, ctx)
            if observer is not None:
                observer.observe("scorer", scorer.name, observer.clock_s() - t0)
            if not scorer.normalized:
                raw = [clamp_unit(v) for v in raw]
            per_scorer.append(raw)
            totals = [t + weight * v for t, v in zip(totals, raw, strict=True)]
        t0 = observer.clock_s() if observer is not None else 0.0
        order = self.picker.rank(request, candidates, totals, ctx)
        if observer is not None:
            observer.observe("picker", self.picker.name, observer.clock_s() - t0)
        ids = [inst.instance_id for inst in candidates]
        explanation = None
        if explain:
            explanation = Explanation(
                profile=self.name,
                picker=self.picker.name,
                weights=tuple((scorer.name, weight) for scorer, weight in self.scorers),
                candidates=tuple((ids[k], totals[k], tuple(col[k] for col in per_scorer)) for k in order),
                window=window,
            )
        return Decision(
            instance_ids=tuple(map(ids.__getitem__, order)),
            reason=self.picker.name,
            scores=RankedScores(ids, totals, order),
            explanation=explanation,
        )

    def decide_reference(self, view: ClusterView, request: RequestInfo) -> Decision:
        """`decide` with one `keep`/`score` call per instance and the picker's `order`: the
        definition the fast path must match (kept for tests)."""
        ctx = DispatchContext(now_s=view.now_s, rng=self.rng)
        candidates = list(view.instances)
        if not candidates:
            raise NoInstanceAvailable(f"request {request.request_id}: no instances registered")
        for flt in self.filters:
            kept = [inst for inst in candidates if flt.keep(request, inst, ctx)]
            if not kept:
                raise NoInstanceAvailable(
                    f"request {request.request_id} (model {request.model!r}): filter {flt.name!r} "
                    f"removed the last {len(candidates)} candidate(s)"
                )
            candidates = kept
        scored: list[tuple[InstanceState, float]] = []
        for inst in candidates:
            total = 0.0
            for scorer, weight in self.scorers:
                value = scorer.score(request, inst, ctx)
                total += weight * (value if scorer.normalized else clamp_unit(value))
            scored.append((inst, total))
        ordered = self.picker.order(request, scored, ctx)
        score_of = {inst.instance_id: s for inst, s in scored}
        return Decision(
            instance_ids=tuple(inst.instance_id for inst in ordered),
            reason=self.picker.name,
            scores=tuple((inst.instance_id, score_of[inst.instance_id]) for inst in ordered),
        )

    @property
    def reads_progress(self) -> bool:
        """Whether any part reads load that changes inside a decode stretch (see `Filter`);
        a subclass that overrides `decide` may read anything."""
        if type(self).decide is not DispatchPolicy.decide:
            return True
        return (
            any(flt.reads_progress for flt in self.filters)
            or any(scorer.reads_progress for scorer, _ in self.scorers)
            or self.picker.reads_progress
        )

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        for scorer, _ in self.scorers:
            scorer.on_dispatch(request, instance_id)
        self.picker.on_dispatch(request, instance_id)

    def on_finish(self, request: RequestInfo, instance_id: str) -> None:
        for scorer, _ in self.scorers:
            scorer.on_finish(request, instance_id)


def clamp_unit(value: float) -> float:
    """A score forced into [0, 1] (NaN counts as 0: the worst, never the best)."""
    if value >= 1.0:
        return 1.0
    if value > 0.0:
        return value
    return 0.0


def _named(kind: str, registry: Mapping[str, type[Any]], spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A part is given as `name` or `{name: {param: value}}`."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and len(spec) == 1:
        name, raw = next(iter(spec.items()))
        if raw is not None and not isinstance(raw, Mapping):
            raise PolicyConfigError(f"{where}.{name}: expected a mapping of parameters, got {raw!r}")
        params = dict(raw or {})
    else:
        raise PolicyConfigError(f"{where}: expected a {kind} name or {{name: params}}, got {spec!r}")
    if name not in registry:
        raise PolicyConfigError(
            f"{where}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}"
        )
    return name, params


def build_policy(
    config: Mapping[str, Any] | None, where: str = "dispatch", seed: int = 0, name: str = ""
) -> DispatchPolicy:
    """Assemble a policy (one dispatch profile) from config:

        filters: [model, healthy, not_draining, not_cordoned]  # default
        scorers: [{least_outstanding: {weight: 1.0}}] # weight defaults to 1
        picker: max_score                             # or round_robin, random, ...

    Each part's parameters are checked against its typed parameter class first."""
    _load_builtin_policies()
    config = dict(config or {})
    unknown = sorted(set(config) - {"filters", "scorers", "picker", "seed"})
    if unknown:
        raise PolicyConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: filters, scorers, picker, seed")
    filters: list[Filter] = []
    for i, spec in enumerate(_listed(config, "filters", ["model", "healthy", "not_draining", "not_cordoned"], where)):
        part, params = _named("filter", FILTERS, spec, f"{where}.filters[{i}]")
        filters.append(_construct(FILTERS[part], params, f"{where}.filters[{i}].{part}"))
    scorers: list[tuple[Scorer, float]] = []
    for i, spec in enumerate(_listed(config, "scorers", ["least_outstanding"], where)):
        part, params = _named("scorer", SCORERS, spec, f"{where}.scorers[{i}]")
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise PolicyConfigError(
                f"{where}.scorers[{i}].{part}.weight: expected a number >= 0 (scores are in [0, 1]), got {weight!r}"
            )
        scorers.append((_construct(SCORERS[part], params, f"{where}.scorers[{i}].{part}"), float(weight)))
    part, params = _named("picker", PICKERS, config.get("picker", "max_score"), f"{where}.picker")
    picker = _construct(PICKERS[part], params, f"{where}.picker.{part}")
    policy_seed = config.get("seed", seed)
    if isinstance(policy_seed, bool) or not isinstance(policy_seed, int):
        raise PolicyConfigError(f"{where}.seed: expected an integer, got {policy_seed!r}")
    return DispatchPolicy(filters, scorers, picker, seed=policy_seed, name=name)


def _listed(config: Mapping[str, Any], key: str, default: list[Any], where: str) -> list[Any]:
    value = config.get(key, default)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise PolicyConfigError(f"{where}.{key}: expected a list of part names or {{name: params}}, got {value!r}")
    return list(value)


_T = TypeVar("_T")


def _construct(cls: Callable[..., _T], params: dict[str, Any], where: str) -> _T:
    checked = check_params(cls, params, where)  # type: ignore[arg-type]
    try:
        return cls(**checked)
    except TypeError as exc:
        raise PolicyConfigError(f"{where}: {exc}") from exc
