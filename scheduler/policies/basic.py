"""The filters every deployment needs, and the plain max-score picker."""

from __future__ import annotations

from scheduler.dispatch_parts import (
    DispatchContext,
    Filter,
    Picker,
    register_filter,
    register_picker,
)
from scheduler.types import InstanceState, RequestInfo

try:  # see scheduler/dispatch_parts.py
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - mypy is a dev dependency
    from scheduler.dispatch_parts import _no_mypyc_attr as mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)
class ServesModel(Filter):
    """Keeps instances serving the requested model (case-insensitive)."""

    reads_progress = False
    static = True

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return instance.model.lower() == request.model.lower()

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        wanted = request.model
        model = wanted.lower()
        # An exact match needs no lower(): the usual case, checked first.
        return [inst for inst in instances if inst.model == wanted or inst.model.lower() == model]


@mypyc_attr(allow_interpreted_subclasses=True)
class Healthy(Filter):
    reads_progress = False
    static = True

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return instance.healthy

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        return [inst for inst in instances if inst.healthy]


@mypyc_attr(allow_interpreted_subclasses=True)
class NotDraining(Filter):
    """A draining or terminating instance finishes its running requests but gets no new ones."""

    reads_progress = False
    static = True

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return not instance.draining

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        return [inst for inst in instances if not inst.draining]


@mypyc_attr(allow_interpreted_subclasses=True)
class NotCordoned(Filter):
    """A cordoned instance (`tokenyard instances cordon`) keeps its running requests and
    gets no new ones; unlike draining, nothing is moved off it and no scale-down counts it."""

    reads_progress = False
    static = True

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return not instance.cordoned

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        return [inst for inst in instances if not inst.cordoned]


@mypyc_attr(allow_interpreted_subclasses=True)
class HasKvRoom(Filter):
    """Keeps instances with free KV blocks for the prompt (unknown capacity passes)."""

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        if instance.kv_blocks_total <= 0:
            return True
        needed = -(-request.input_tokens // max(1, instance.block_size_tokens))
        return instance.kv_blocks_free >= needed


@mypyc_attr(allow_interpreted_subclasses=True)
class MaxScore(Picker):
    """Highest score first; ties broken by instance id so decisions are reproducible."""

    reads_progress = False
    _MAX_CACHED = 64  # candidate lists whose id order is remembered

    def __init__(self) -> None:
        self._id_order: dict[tuple[str, ...], list[int]] = {}
        self._last_instances: list[InstanceState] | None = None
        self._last_by_id: list[int] = []

    def order(
        self,
        request: RequestInfo,
        scored: list[tuple[InstanceState, float]],
        ctx: DispatchContext,
    ) -> list[InstanceState]:
        ranked = sorted(scored, key=lambda pair: (-pair[1], pair[0].instance_id))
        return [inst for inst, _ in ranked]

    def rank(
        self,
        request: RequestInfo,
        instances: list[InstanceState],
        scores: list[float],
        ctx: DispatchContext,
    ) -> list[int]:
        # Positions in instance-id order (cached per candidate list), then a stable sort on
        # the score alone, descending (reverse=True keeps equal scores in their id order):
        # the (-score, id) order `order` gives, without a key tuple per candidate or a
        # string comparison per tie.
        if ctx.candidates_stable and instances is self._last_instances:
            by_id = self._last_by_id  # the policy's cached candidate list, as last time
        else:
            ids = tuple([inst.instance_id for inst in instances])
            cached = self._id_order.get(ids)
            if cached is None:
                if len(self._id_order) >= self._MAX_CACHED:
                    self._id_order.clear()
                cached = self._id_order[ids] = sorted(range(len(ids)), key=ids.__getitem__)
            by_id = cached
            if ctx.candidates_stable:
                self._last_instances, self._last_by_id = instances, by_id
        return sorted(by_id, key=scores.__getitem__, reverse=True)


# Registered after the classes, not by a class decorator: mypyc compiles a decorated class
# as a plain Python class (the router's --native build, router/native.py).
register_filter("model")(ServesModel)
register_filter("healthy")(Healthy)
register_filter("not_draining")(NotDraining)
register_filter("not_cordoned")(NotCordoned)
register_filter("kv_room")(HasKvRoom)
register_picker("max_score")(MaxScore)
