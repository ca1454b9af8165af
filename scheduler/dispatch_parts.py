"""The dispatch extension points and their registry: what a policy part is and how it is named.

The base classes of the three extension points (`Filter`, `Scorer`, `Picker`), the
per-decision `DispatchContext` they see, the name -> class registries and the
`register_*` decorators that fill them, and `PolicyConfigError`. The built-in parts
(`scheduler/policies/`) and out-of-tree plugins import this module to register
themselves; `scheduler.dispatch` imports it and them to assemble a `DispatchPolicy`, so the
parts never import the policy that is built from them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from scheduler.types import InstanceState, RequestInfo

_C = TypeVar("_C")


def _no_mypyc_attr(*_args: object, **_kwargs: object) -> Callable[[_C], _C]:
    return lambda cls: cls


# mypyc reads the decorator at compile time (and a compiled class does not call it); plain
# Python without mypy installed gets a decorator that does nothing.
try:
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - mypy is a dev dependency
    mypyc_attr = _no_mypyc_attr


class PolicyConfigError(ValueError):
    """Unknown policy name or bad parameters; the message lists what is allowed."""


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class DispatchContext:
    """Per-decision inputs that are not instance load: clock and a seeded RNG."""

    now_s: float
    rng: random.Random
    # True when the candidates are the policy's cached result of the static filters: the
    # same list object, unchanged, for as long as the cluster's membership version holds
    # (parts may key caches on the list's identity then).
    candidates_stable: bool = False


# Compiled in the router's --native build (router/native.py): plugins subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Filter:
    """Removes instances that must not receive the request."""

    name: ClassVar[str] = ""
    # Whether this part reads the load fields that change while an engine decodes an
    # unchanged batch (`kv_blocks_used`, `kv_usage`, `kv_blocks_free`, `tokens_in_flight`,
    # `updated_s`). The simulator keeps those exact inside fast-forwarded stretches only
    # for policies with a part that reads them; a new part is assumed to (True).
    reads_progress: ClassVar[bool] = True
    # True: `keep` depends only on the request's model and the instance's id, model,
    # health, draining and cordoned flags (what `ClusterView.membership_version` covers).
    static: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        if params:
            raise PolicyConfigError(f"filter {self.name!r} takes no parameters, got {sorted(params)}")

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        raise NotImplementedError

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        """The instances `keep` keeps, in order. Built-ins override it with one comprehension
        (the per-instance call dominates a decision on a large fleet); an override must
        return exactly what this loop returns."""
        keep = self.keep
        return [inst for inst in instances if keep(request, inst, ctx)]


# Compiled in the router's --native build (router/native.py): plugins subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Scorer:
    """Scores an instance for a request in [0, 1]; higher is better. Scores are combined by
    weight. A scorer that does not promise [0, 1] leaves `normalized` False and its scores
    are clamped to it."""

    name: ClassVar[str] = ""
    normalized: ClassVar[bool] = False
    # Whether this part reads the load fields that change while an engine decodes an
    # unchanged batch (`kv_blocks_used`, `kv_usage`, `kv_blocks_free`, `tokens_in_flight`,
    # `updated_s`). The simulator keeps those exact inside fast-forwarded stretches only
    # for policies with a part that reads them; a new part is assumed to (True).
    reads_progress: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        if params:
            raise PolicyConfigError(f"scorer {self.name!r} takes no parameters, got {sorted(params)}")

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        raise NotImplementedError

    def score_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[float]:
        """`score` of every instance, in order; an override must return exactly these values."""
        score = self.score
        return [score(request, inst, ctx) for inst in instances]

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        """The driver sent `request` to `instance_id`."""

    def on_finish(self, request: RequestInfo, instance_id: str) -> None:
        """`request` finished (or failed) on `instance_id`."""


# Compiled in the router's --native build (router/native.py): plugins subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Picker:
    """Orders the scored candidates; the first is chosen, the rest are fallbacks."""

    name: ClassVar[str] = ""
    # Whether this part reads the load fields that change while an engine decodes an
    # unchanged batch (`kv_blocks_used`, `kv_usage`, `kv_blocks_free`, `tokens_in_flight`,
    # `updated_s`). The simulator keeps those exact inside fast-forwarded stretches only
    # for policies with a part that reads them; a new part is assumed to (True).
    reads_progress: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        if params:
            raise PolicyConfigError(f"picker {self.name!r} takes no parameters, got {sorted(params)}")

    def order(
        self,
        request: RequestInfo,
        scored: list[tuple[InstanceState, float]],
        ctx: DispatchContext,
    ) -> list[InstanceState]:
        raise NotImplementedError

    def rank(
        self,
        request: RequestInfo,
        instances: list[InstanceState],
        scores: list[float],
        ctx: DispatchContext,
    ) -> list[int]:
        """`order` as positions into `instances` (scores[k] is instances[k]'s). Pickers that
        can order without building (instance, score) pairs override it; an override must
        give the order `order` gives and the same side effects (RNG draws, state)."""
        ordered = self.order(request, list(zip(instances, scores, strict=True)), ctx)
        position = {id(inst): k for k, inst in enumerate(instances)}
        return [position[id(inst)] for inst in ordered]

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        """The driver sent `request` to `instance_id`."""


FILTERS: dict[str, type[Filter]] = {}
SCORERS: dict[str, type[Scorer]] = {}
PICKERS: dict[str, type[Picker]] = {}

_F = TypeVar("_F", bound=type[Filter])
_S = TypeVar("_S", bound=type[Scorer])
_P = TypeVar("_P", bound=type[Picker])


def register_filter(name: str) -> Callable[[_F], _F]:
    def wrap(cls: _F) -> _F:
        cls.name = name
        FILTERS[name] = cls
        return cls

    return wrap


def register_scorer(name: str) -> Callable[[_S], _S]:
    def wrap(cls: _S) -> _S:
        cls.name = name
        SCORERS[name] = cls
        return cls

    return wrap


def register_picker(name: str) -> Callable[[_P], _P]:
    def wrap(cls: _P) -> _P:
        cls.name = name
        PICKERS[name] = cls
        return cls

    return wrap
