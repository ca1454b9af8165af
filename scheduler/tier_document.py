"""The `tiers:` section of the policy document (scheduler.policy_document): the model tier
alias and its decision, typed. `TiersSpec.to_section()` gives the mapping that
`scheduler.tiers.build_tier_router` reads (with the tier model's held-out table);
`check_tiers` validates what pydantic cannot (known policy, alias distinct from the models,
target vs floor) by building the router on a one-row table.

    tiers:
      alias: auto
      small_model: qwen2.5-1.5b
      large_model: llama-3-8b
      policy: load_aware               # scheduler.tiers.TIER_POLICIES
      model_file: /path/tier.json      # default: the packaged tier model
      pressure: {start: 0.6, full: 1.0, tpot: {start: 0.5, full: 1.0}}   # tpot: false = TTFT alone
      mean_output_tokens: 256
      default: {quality_target: 0.9, quality_floor: 0.5}
      classes: {batch: {cost_budget: 0.2, quality_floor: 0.3}}
      tenants: {acme: {quality_floor: 0.8, quality_target: 0.95}}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scheduler.tiers import ThresholdPoint, TierConfigError, build_tier_router


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierClassSpec(_Strict):
    """A tenant's or SLO class's quality contract: PGR target or large-call budget, and floor."""

    quality_target: float | None = Field(default=None, ge=0, le=1)
    cost_budget: float | None = Field(default=None, ge=0, le=1)
    quality_floor: float = Field(default=0.0, ge=0, le=1)


class TierTpotPressureSpec(_Strict):
    """Multiples of the TPOT SLO (predicted from the prefill rate) between which a tier's
    TPOT pressure goes from 0 to 1."""

    start: float = Field(default=0.5, ge=0)
    full: float = Field(default=1.0, gt=0)


class TierPressureSpec(_Strict):
    """Multiples of the TTFT SLO between which a tier's pressure goes from 0 to 1; `tpot`:
    the TPOT pressure's (true: the defaults, false: TTFT alone)."""

    start: float = Field(default=0.6, ge=0)
    full: float = Field(default=1.0, gt=0)
    tpot: bool | TierTpotPressureSpec = True


class TiersSpec(_Strict):
    """The tier alias and its decision (docs/tiers.md)."""

    alias: str = Field(default="auto", min_length=1)
    small_model: str = Field(min_length=1)
    large_model: str = Field(min_length=1)
    policy: str = "load_aware"
    model_file: str | None = None  # read by the router and the simulator, never here
    pressure: TierPressureSpec = Field(default_factory=TierPressureSpec)
    mean_output_tokens: int = Field(default=256, ge=1, le=1_000_000)
    default: TierClassSpec | None = None
    classes: dict[str, TierClassSpec] = Field(default_factory=dict)
    tenants: dict[str, TierClassSpec] = Field(default_factory=dict)

    def to_section(self, with_model_file: bool = True) -> dict[str, Any]:
        """The `build_tier_router` mapping (plus `model_file` for router/tiers.py)."""
        body = self.model_dump(mode="json", exclude_none=True)
        for key in ("classes", "tenants"):
            body[key] = {name: {k: v for k, v in spec.items() if v is not None} for name, spec in body[key].items()}
        if not with_model_file:
            body.pop("model_file", None)
        return body


# A stand-in for the tier model's held-out table: checks the section's shape, not thresholds.
_CHECK_TABLE = (ThresholdPoint(threshold=0.5, large_share=0.5, pgr=0.5),)


def check_tiers(spec: TiersSpec, where: str) -> str | None:
    """The one-line problem of a section pydantic accepted, or None."""
    try:
        build_tier_router(spec.to_section(with_model_file=False), _CHECK_TABLE, where)
    except TierConfigError as exc:
        return str(exc)
    return None
