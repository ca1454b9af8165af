"""Load shedding: whether a request should be refused (HTTP 429) rather than queued.

Pure: the candidate instances' load and the request's priority in, a yes/no out. The
Gateway API Inference Extension's endpoint picker protocol answers 429 for a sheddable
request when the servers are under heavy load; this module owns what "sheddable" and
"heavy load" mean here. A request is sheddable when its priority number is at least
`shed_priority_at_least` (vLLM convention: a larger number runs later), and the fleet is
saturated when every usable candidate already has `max_outstanding_per_instance` requests
outstanding. With no usable candidate the answer is no: that is a 503 (nothing ready),
not a 429.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.types import InstanceState


@dataclass(frozen=True, slots=True)
class ShedPolicy:
    max_outstanding_per_instance: int = 0  # 0: never shed
    shed_priority_at_least: int = 2

    def __post_init__(self) -> None:
        if self.max_outstanding_per_instance < 0:
            raise ValueError(f"max_outstanding_per_instance: expected >= 0, got {self.max_outstanding_per_instance}")


def should_shed(candidates: Iterable[InstanceState], priority: int, policy: ShedPolicy) -> bool:
    """True when a request of `priority` should be refused now (every usable candidate is full)."""
    if policy.max_outstanding_per_instance <= 0 or priority < policy.shed_priority_at_least:
        return False
    usable = 0
    for state in candidates:
        if not state.healthy or state.draining or state.cordoned:
            continue
        usable += 1
        if state.outstanding < policy.max_outstanding_per_instance:
            return False
    return usable > 0
