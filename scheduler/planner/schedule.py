"""A day's fleet schedule from a rate series: one plan per step, and the day's cost against
a static fleet sized for the peak."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.planner.problem import Plan, PlanError, PlanProblem
from scheduler.planner.solver import solve


@dataclass(frozen=True, slots=True)
class ScheduleStep:
    start_s: float
    duration_s: float
    rate_rps: float
    plan: Plan


@dataclass(frozen=True, slots=True)
class DaySchedule:
    steps: tuple[ScheduleStep, ...]
    peak_plan: Plan

    @property
    def scheduled_usd(self) -> float:
        return sum(s.plan.usd_per_hour * s.duration_s / 3600.0 for s in self.steps)

    @property
    def static_peak_usd(self) -> float:
        return self.peak_plan.usd_per_hour * sum(s.duration_s for s in self.steps) / 3600.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "scheduled_usd": round(self.scheduled_usd, 4),
            "static_peak_usd": round(self.static_peak_usd, 4),
            "saving_fraction": round(1 - self.scheduled_usd / self.static_peak_usd, 4) if self.static_peak_usd else None,
            "steps": [{"start_s": s.start_s, "duration_s": s.duration_s, "rate_rps": s.rate_rps,
                       "usd_per_hour": round(s.plan.usd_per_hour, 4), "instances": s.plan.instances()}
                      for s in self.steps],
            "peak": {"usd_per_hour": round(self.peak_plan.usd_per_hour, 4), "instances": self.peak_plan.instances()},
        }


def scaled(problem: PlanProblem, rate_rps: float) -> PlanProblem:
    """The same length mix at `rate_rps` in total."""
    total = sum(b.rate_rps for b in problem.buckets)
    if total <= 0:
        raise PlanError("workload: empty (total request rate is 0)")
    factor = rate_rps / total
    return dataclasses.replace(
        problem, buckets=tuple(dataclasses.replace(b, rate_rps=b.rate_rps * factor) for b in problem.buckets)
    )


def day_schedule(problem: PlanProblem, rates_rps: Sequence[float], step_s: float) -> DaySchedule:
    """A plan per step of `rates_rps` (the problem's mix at each rate). A step at rate 0
    has no fleet (cost 0): pools may scale to zero."""
    if not rates_rps or any(r < 0 for r in rates_rps) or max(rates_rps) <= 0:
        raise PlanError("--rates: expected a non-empty series of non-negative rates with a positive peak")
    if step_s <= 0:
        raise PlanError(f"--step-s: expected a positive number of seconds, got {step_s}")
    plans: dict[float, Plan] = {}
    steps = []
    for k, rate in enumerate(rates_rps):
        if rate not in plans:
            plans[rate] = (solve(scaled(problem, rate)) if rate > 0
                           else dataclasses.replace(solve(scaled(problem, max(rates_rps))), pools=(), usd_per_hour=0.0))
        steps.append(ScheduleStep(k * step_s, step_s, rate, plans[rate]))
    return DaySchedule(tuple(steps), plans[max(rates_rps)])
