"""The decision layer both drivers hold: one policy document turned into the objects that
decide, called the same way by the router and the simulator.

    layer = DecisionLayer(load_policy_document(raw))
    policy = layer.profile(request)                  # tenant's, else SLO class's, else default
    decision = layer.decide(policy, group, request, now_s)   # candidate window, then the profile
    priority = layer.priority(request, now_s)        # the engine priority to forward

`group` is the request's model's instances (`group_by_model`), in the driver's stable
order. Above `window.max_candidates` the profile scores a window of that many at an offset
drawn from the profile's own seeded RNG (the "power of d choices" Envoy's least-request
balancer uses): with the drivers' in-flight counts it balances as well as a full scan, at
a fixed cost. If nothing in the window passes the filters, the whole group is scanned, so a
mostly-draining fleet still finds its healthy instances.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.admission import AdmissionQueue, SaturationDetector
from scheduler.dispatch import ClusterView, DispatchPolicy, PluginObserver
from scheduler.planner.routing import RoutingTable
from scheduler.policy_document import PolicyDocument
from scheduler.queueing import QueuePolicy, QueueSort
from scheduler.types import Decision, InstanceState, NoInstanceAvailable, RequestInfo, SloClass

try:  # see scheduler/dispatch_parts.py
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - mypy is a dev dependency
    from scheduler.dispatch_parts import _no_mypyc_attr as mypyc_attr


def group_by_model(instances: Sequence[InstanceState]) -> dict[str, tuple[InstanceState, ...]]:
    """Instances per model name, lower-cased, in the given order."""
    by_model: dict[str, list[InstanceState]] = {}
    for state in instances:
        by_model.setdefault(state.model.lower(), []).append(state)
    return {model: tuple(states) for model, states in by_model.items()}


def window_of(group: Sequence[InstanceState], limit: int, start: int) -> Sequence[InstanceState]:
    """`limit` consecutive instances of `group` from `start`, wrapping around."""
    window = group[start:start + limit]
    if len(window) < limit:
        window = (*window, *group[:limit - len(window)])
    return window


# Compiled in the router's --native build (router/native.py); drivers and tests may subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class DecisionLayer:
    """Profiles, window, engine priority and queue order from one `PolicyDocument`."""

    def __init__(self, document: PolicyDocument, seed: int | None = None,
                 override: DispatchPolicy | None = None) -> None:
        self.document = document
        self.profiles: dict[str, DispatchPolicy] = document.build_profiles(seed)
        self.override = override  # one policy for every request (tests, policy comparisons)
        self.slo_classes: dict[str, SloClass] = document.slo_class_map()
        self.engine_priority: QueuePolicy = document.build_engine_priority()
        self.queue_sort: QueueSort = document.build_queue_sort()
        self.max_candidates = document.window.max_candidates
        self.default_slo = self.slo_classes.get("default")
        self.admission_enabled = document.admission.enabled
        self.detector = SaturationDetector(document.admission.saturation,
                                           by_slo_class=document.admission.saturation_by_slo_class,
                                           hold_until_ready=document.admission.hold_until_ready)

    def new_admission_queue(self) -> AdmissionQueue:
        """The queue a driver holds (one per router replica, one per simulation)."""
        return AdmissionQueue(self.document.admission, self.document.build_queue_sort())

    def saturated(self, group: Sequence[InstanceState], request: RequestInfo) -> bool:
        return self.detector.saturated(group, request, self.slo_classes.get(request.slo_class))

    def set_observer(self, observer: PluginObserver | None) -> None:
        for policy in self.all_policies():
            policy.observer = observer

    def all_policies(self) -> list[DispatchPolicy]:
        policies = list(self.profiles.values())
        if self.override is not None:
            policies.append(self.override)
        return policies

    def set_routing_table(self, table: RoutingTable) -> int:
        """The autoscaler's new plan as the length-bucket routing of every profile (and the
        override) that routes by a plan; how many filters took it."""
        from scheduler.policies.length_bucket import set_routing_table

        return sum(set_routing_table(policy, table) for policy in self.all_policies())

    @property
    def reads_progress(self) -> bool:
        return any(p.reads_progress for p in self.all_policies())

    def profile_name(self, request: RequestInfo, pinned: str | None = None) -> str:
        """`pinned` (a tenant's configured or admin-set profile) if it exists, else the
        document's selection for the request's tenant and SLO class."""
        if pinned is not None and pinned in self.profiles:
            return pinned
        return self.document.profile_for(request.tenant, request.slo_class)

    def profile(self, request: RequestInfo, pinned: str | None = None) -> DispatchPolicy:
        if self.override is not None:
            return self.override
        return self.profiles[self.profile_name(request, pinned)]

    def slo_class(self, name: str) -> SloClass | None:
        found = self.slo_classes.get(name)
        return found if found is not None else self.default_slo

    def priority(self, request: RequestInfo, now_s: float) -> int:
        return self.engine_priority.priority(request, self.slo_classes.get(request.slo_class), now_s)

    def decide(
        self,
        policy: DispatchPolicy,
        group: Sequence[InstanceState],
        request: RequestInfo,
        now_s: float,
        *,
        fallback: Sequence[InstanceState] = (),
        membership_version: int | None = None,
        explain: bool = False,
    ) -> Decision:
        """The profile's decision over the window of `group` (see the module docstring);
        an empty group is decided over `fallback` (every instance), so the error names the
        filter that removed them."""
        limit = self.max_candidates
        if limit and len(group) > limit:
            window = window_of(group, limit, policy.rng.randrange(len(group)))
            try:
                return _decide(policy, ClusterView(window, now_s), request, explain)
            except NoInstanceAvailable:
                pass  # nothing usable in the window: scan everything
        return _decide(policy, ClusterView(group or fallback, now_s, membership_version), request, explain)


def _decide(policy: DispatchPolicy, view: ClusterView, request: RequestInfo, explain: bool) -> Decision:
    # Only asked to explain when wanted, so a subclass with the older decide(view, request) works.
    return policy.decide(view, request, explain) if explain else policy.decide(view, request)
