"""Priority headroom: the KV blocks an instance keeps free for its high-priority requests.

Llumnix's virtual usage counts, besides the KV blocks held and the queued demand, a
headroom for each running request of a high-priority class, so that such an instance looks
fuller than it is: dispatch sends it less, and migration moves work off it sooner, and its
high-priority decodes keep room to grow. One definition, read by both consumers of the
measure: dispatch's `least_virtual_usage` (scheduler/policies/virtual_usage.py) and the
migration policy (scheduler/migration.py), so the two never balance different loads.

The count is an engine fact, not a policy one: drivers publish each instance's running
requests by priority class (`InstanceState.running_by_priority`; the simulator from its
cores, the router from the Worker `Status` stream's `LoadSnapshot.running_by_priority`),
and the policy's threshold (`high_priority_below`: a priority value below it is high
priority, lower runs earlier as in vLLM) picks the classes that count. Unknown (a vLLM
/metrics scrape has no such series): no headroom, as before the term existed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.types import RunningByPriority

# At most this many distinct priority classes are taken from an engine's report (a bound
# on what a peer can make the router keep; the SLO classes of a document are a handful).
MAX_PRIORITY_CLASSES = 64


def running_by_priority(priorities: Iterable[int]) -> RunningByPriority:
    """The running requests' priorities counted per class, as drivers publish them."""
    counts: dict[int, int] = {}
    for priority in priorities:
        counts[priority] = counts.get(priority, 0) + 1
    return tuple(sorted(counts.items()))


class PriorityHeadroomError(ValueError):
    """A bad headroom parameter; the message names it and what is allowed."""


@dataclass(frozen=True, slots=True)
class PriorityHeadroom:
    """`blocks_per_request` KV blocks kept free per running request whose priority is below
    `high_priority_below` (0 and 0: none, the default everywhere)."""

    blocks_per_request: int = 0
    high_priority_below: int = 0

    def __post_init__(self) -> None:
        value = self.blocks_per_request
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PriorityHeadroomError(f"priority_headroom_blocks: expected an integer >= 0, got {value!r}")
        below = self.high_priority_below
        if isinstance(below, bool) or not isinstance(below, int):
            raise PriorityHeadroomError(f"high_priority_below: expected an integer, got {below!r}")

    @property
    def active(self) -> bool:
        """Whether the term can be non-zero (drivers may skip counting when it cannot)."""
        return self.blocks_per_request > 0

    def high_priority_running(self, counts: RunningByPriority | None) -> int:
        """Running requests of a high-priority class; 0 when the counts are unknown."""
        if not counts:
            return 0
        below = self.high_priority_below
        return sum(n for priority, n in counts if priority < below)

    def blocks(self, high_priority_running: int) -> int:
        """The headroom term of virtual usage, in KV blocks."""
        return self.blocks_per_request * high_priority_running


NO_HEADROOM = PriorityHeadroom()
