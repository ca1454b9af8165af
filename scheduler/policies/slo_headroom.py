"""SLO-headroom scorer: prefer the instance that leaves the most room under the TTFT SLO.

Predicted TTFT on an instance = the time of one engine iteration that prefills everything
queued ahead of the request plus its own prompt, while the running sequences decode
(EngineModel, for that instance's GPU, model and tensor parallelism), plus a penalty when
the instance has no free KV blocks for the prompt (the request would wait for a running
one to finish). Headroom h = (SLO - predicted) / SLO: 1 for an instant start, 0 at the SLO,
negative when the SLO would be missed. The score maps it into [0, 1] without a floor:
0.5 + h / 2 while the SLO is met (0.5 .. 1), 0.5 / (1 - h) once it is missed (0 .. 0.5),
so every instance that meets the SLO beats every one that misses it, and among those that
miss, the least late wins.

Requests queued ahead are counted from the larger of the scraped and the router-side
counts (`InstanceState.outstanding`), minus those running; their prompts are taken to be
as long as this one (the router knows only counts, not their lengths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler.catalog import Catalog, CatalogError, default_catalog
from scheduler.dispatch_parts import DispatchContext, PolicyConfigError, Scorer, register_scorer
from scheduler.engine_model import EngineModel
from scheduler.types import InstanceState, RequestInfo

DEFAULT_TTFT_SLO_MS: dict[str, float] = {"interactive": 1000.0, "default": 3000.0, "batch": 60000.0}


def headroom_score(headroom: float) -> float:
    """Headroom (1 at an instant start, 0 at the SLO, negative past it) mapped into [0, 1]."""
    if headroom >= 0.0:
        return 0.5 + 0.5 * headroom
    return 0.5 / (1.0 - headroom)


@register_scorer("slo_headroom")
class SloHeadroom(Scorer):
    """Parameters: `ttft_slo_ms` ({slo class: ms}), `default_ttft_slo_ms`,
    `context_tokens_per_seq` (assumed KV context of each running sequence),
    `kv_full_penalty_s`, `unknown_iteration_s` (per-request cost when the instance's GPU or
    model is not in the catalog). The policy document gives it the document's SLO classes
    as `ttft_slo_ms` unless the profile names its own, so it reads the class each request
    carries with the targets the operator set."""

    normalized = True
    internal_params = ("catalog",)  # given by code (tests, a custom catalog), not by a document

    def __init__(
        self,
        ttft_slo_ms: Mapping[str, Any] | None = None,
        default_ttft_slo_ms: float = 3000.0,
        context_tokens_per_seq: int = 512,
        kv_full_penalty_s: float = 1.0,
        unknown_iteration_s: float = 0.05,
        catalog: Catalog | None = None,
    ) -> None:
        slo_ms = dict(DEFAULT_TTFT_SLO_MS)
        for name, value in (ttft_slo_ms or {}).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise PolicyConfigError(f"slo_headroom.ttft_slo_ms.{name}: expected a number > 0, got {value!r}")
            slo_ms[str(name)] = float(value)
        if default_ttft_slo_ms <= 0:
            raise PolicyConfigError(f"slo_headroom.default_ttft_slo_ms: expected > 0, got {default_ttft_slo_ms}")
        self.ttft_slo_s = {name: ms / 1000.0 for name, ms in slo_ms.items()}
        self.default_ttft_slo_s = float(default_ttft_slo_ms) / 1000.0
        self.context_tokens_per_seq = int(context_tokens_per_seq)
        self.kv_full_penalty_s = float(kv_full_penalty_s)
        self.unknown_iteration_s = float(unknown_iteration_s)
        self.catalog = catalog or default_catalog()
        self._models: dict[tuple[str, str, int], EngineModel | None] = {}

    def engine_model(self, instance: InstanceState) -> EngineModel | None:
        key = (instance.gpu, instance.model, instance.tp)
        if key in self._models:
            return self._models[key]
        try:
            model: EngineModel | None = EngineModel(
                self.catalog.gpu(instance.gpu), self.catalog.model(instance.model), instance.tp
            )
        except (CatalogError, ValueError):
            model = None
        self._models[key] = model
        return model

    def predicted_ttft_s(self, request: RequestInfo, instance: InstanceState) -> float:
        running = instance.running
        ahead = instance.outstanding - running
        if instance.waiting > ahead:
            ahead = instance.waiting
        if ahead < 0:
            ahead = 0
        prompt = request.input_tokens if request.input_tokens > 0 else 1
        model = self.engine_model(instance)
        if model is None:
            predicted = (ahead + 1) * self.unknown_iteration_s
        else:
            prefill_tokens = (ahead + 1) * prompt
            predicted = model.iteration_time_s(
                prefill_tokens=prefill_tokens,
                decode_seqs=running,
                context_tokens=running * self.context_tokens_per_seq,
                prefill_attention_pairs=(ahead + 1) * prompt * (prompt + 1) / 2.0,
            )
        if instance.kv_blocks_total > 0:
            needed = -(-prompt // max(1, instance.block_size_tokens))
            if instance.kv_blocks_free < needed:
                predicted += self.kv_full_penalty_s
        return predicted

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        slo_s = self.ttft_slo_s.get(request.slo_class, self.default_ttft_slo_s)
        return headroom_score((slo_s - self.predicted_ttft_s(request, instance)) / slo_s)
