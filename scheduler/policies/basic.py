"""The filters every deployment needs, and the plain max-score picker."""

from __future__ import annotations

from scheduler.dispatch import DispatchContext, Filter, Picker, register_filter, register_picker
from scheduler.types import InstanceState, RequestInfo


@register_filter("model")
class ServesModel(Filter):
    """Keeps instances serving the requested model (case-insensitive)."""

    reads_progress = False

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return instance.model.lower() == request.model.lower()

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        model = request.model.lower()
        return [inst for inst in instances if inst.model.lower() == model]


@register_filter("healthy")
class Healthy(Filter):
    reads_progress = False

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return instance.healthy

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        return [inst for inst in instances if inst.healthy]


@register_filter("not_draining")
class NotDraining(Filter):
    """A draining or terminating instance finishes its running requests but gets no new ones."""

    reads_progress = False

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        return not instance.draining

    def keep_all(
        self, request: RequestInfo, instances: list[InstanceState], ctx: DispatchContext
    ) -> list[InstanceState]:
        return [inst for inst in instances if not inst.draining]


@register_filter("kv_room")
class HasKvRoom(Filter):
    """Keeps instances with free KV blocks for the prompt (unknown capacity passes)."""

    def keep(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> bool:
        if instance.kv_blocks_total <= 0:
            return True
        needed = -(-request.input_tokens // max(1, instance.block_size_tokens))
        return instance.kv_blocks_free >= needed


@register_picker("max_score")
class MaxScore(Picker):
    """Highest score first; ties broken by instance id so decisions are reproducible."""

    reads_progress = False

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
        # Plain tuples sort in C without a key call per element; the position breaks ties
        # between equal ids as the stable sort in `order` does.
        keys = [(-s, inst.instance_id, k) for k, (inst, s) in enumerate(zip(instances, scores, strict=True))]
        keys.sort()
        return [k for _, _, k in keys]
