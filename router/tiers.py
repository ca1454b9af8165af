"""Live tier routing: a request for the tier alias (`model: auto`) gets the small or the
large pool's model from `scheduler.tiers.TierRouter`, the same decision the simulator
runs, on the registry's load snapshots of the two pools.

Config (`tiers:` in the router config; every key but `model_file` is scheduler.tiers'):

    tiers:
      model_file: /path/tier.json        # default: the packaged tier model
      alias: auto
      small_model: qwen2.5-1.5b
      large_model: llama-3-8b
      policy: load_aware
      default: {quality_target: 0.9, quality_floor: 0.5}
      classes: {batch: {cost_budget: 0.2, quality_floor: 0.3}}
      tenants: {acme: {quality_floor: 0.8, quality_target: 0.95}}

Every path that takes requests resolves the alias here, with the one decision: the HTTP
front door and the ext_proc picker (`resolve`, on the request body, whose `model` is then
rewritten so the engine sees its own name) and the Picker gRPC service (`decide_info`, on
the `prompt` text the gateway sends in its PickRequest).

Scoring a prompt costs a few hundred microseconds of CPU (bench/tiers.py notes the
figure); it runs inline, once per alias request, on at most MAX_PROMPT_CHARS characters.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from scheduler.predictors.text import prompt_text
from scheduler.predictors.tier import TierModelError, TierPredictor, load_predictor
from scheduler.tiers import TierChoice, TierConfigError, TierRouter, build_tier_router
from scheduler.types import RequestInfo, SloClass

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4


class TierResolver:
    """The predictor and the decision, built once from the `tiers:` section."""

    def __init__(self, predictor: TierPredictor, router: TierRouter, seed: int | None = 0) -> None:
        self.predictor = predictor
        self.router = router
        self.rng = random.Random(seed)  # seed None: OS entropy (a router without a fixed seed)

    def resolve(self, body: dict[str, Any], tenant: str, slo: SloClass, request_id: str,
                dispatcher: Any) -> TierChoice | None:
        """For a body naming the alias: the choice, with `body["model"]` set to its model."""
        model = body.get("model")
        if not isinstance(model, str) or not self.router.handles(model):
            return None
        text = prompt_text(body)
        info = RequestInfo(
            request_id=request_id, model=model, input_tokens=max(1, len(text) // CHARS_PER_TOKEN),
            tenant=tenant, slo_class=slo.name,
        )
        choice = self.decide_info(info, text, slo, dispatcher)
        body["model"] = choice.model
        return choice

    def decide_info(self, info: RequestInfo, text: str | None, slo: SloClass, dispatcher: Any) -> TierChoice:
        """The choice for a request naming the alias: `text` scored (None or empty: the
        request keeps its own p_small_ok; without one it is unscored and goes large,
        `TierRouter.decide`'s rule), on the two tiers' current candidates, at the registry's
        clock (the one the instances' prefill rates are on)."""
        info = replace(info, arrival_s=dispatcher.registry.now_s())
        if text:
            info = replace(info, p_small_ok=self.predictor.score(text))
        instances = (*dispatcher.candidates(self.router.small_model), *dispatcher.candidates(self.router.large_model))
        choice = self.router.decide(info, instances, slo, self.rng)
        log.debug("tier decision", extra={"request_id": info.request_id, "tier": choice.tier, "reason": choice.reason})
        return choice


def build_tier_resolver(doc: Mapping[str, Any], where: str = "tiers", seed: int | None = 0) -> TierResolver:
    """Validate a `tiers:` section now (model file and decision); errors say `where`."""
    body = dict(doc)
    model_file = body.pop("model_file", None)
    if model_file is not None and not isinstance(model_file, str):
        raise TierConfigError(f"{where}.model_file: expected a path, got {model_file!r}")
    try:
        predictor = load_predictor(model_file)
    except TierModelError as exc:
        raise TierConfigError(f"{where}.model_file: {exc}") from exc
    return TierResolver(predictor, build_tier_router(body, predictor.thresholds, where), seed)
