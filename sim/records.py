"""Per-request outcome records and the result of a run: what reports are computed from.

The simulator produces them; the live cross-check builds the same records from real
responses, so one report module serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    tenant: str
    slo_class: str
    model: str
    pool: str  # "" if rejected before dispatch
    instance_id: str
    gpu: str
    arrival_s: float
    dispatch_s: float
    first_token_s: float | None  # None if it never produced a token (rejected)
    finish_s: float | None
    input_tokens: int
    output_tokens: int  # tokens actually generated
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    rejected: bool = False
    reject_reason: str = ""
    ttft_slo_s: float = float("inf")
    tpot_slo_s: float = float("inf")

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (0 for one-token outputs)."""
        if self.finish_s is None or self.first_token_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def ttft_met(self) -> bool:
        ttft = self.ttft_s
        return ttft is not None and ttft <= self.ttft_slo_s

    @property
    def tpot_met(self) -> bool:
        tpot = self.tpot_s
        return tpot is not None and tpot <= self.tpot_slo_s

    @property
    def goodput(self) -> bool:
        """Met both SLOs (DistServe's definition of goodput)."""
        return not self.rejected and self.ttft_met and self.tpot_met


@dataclass(slots=True)
class InstanceStats:
    instance_id: str
    pool: str
    gpu: str
    model: str
    tp: int
    usd_per_hour: float  # for the whole instance (price per GPU x tp)
    busy_s: float = 0.0  # time spent running iterations
    kv_usage_time_integral: float = 0.0  # integral of KV usage fraction over time (for the mean)
    preemptions: int = 0
    requests: int = 0


@dataclass(slots=True)
class TimelineSample:
    """Cluster load at one simulated instant, per pool."""

    t_s: float
    pool: str
    running: int
    waiting: int
    kv_usage: float  # mean over the pool's instances


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    instances: list[InstanceStats]
    timeline: list[TimelineSample] = field(default_factory=list)
    start_s: float = 0.0
    end_s: float = 0.0  # simulated time when the last request finished
    wall_s: float = 0.0
    events: int = 0
    policy: str = ""
    migrations: dict[str, Any] | None = None  # sim.migration.MigrationStats.summary(); None: migration off
