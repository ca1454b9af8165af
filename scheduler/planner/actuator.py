"""Applying a plan: the `Actuator` protocol and the dry run that prints the steps.

A plan is applied as steps per pool: scale-ups first (new capacity before old goes),
then every scale-down as a drain (the instances get no new requests; in-flight ones
finish) followed by the replica change once they are empty. `plan_steps` is the pure
part; an actuator carries the steps out (the Kubernetes one sets each pool's Deployment
replicas through the scale subresource; `DryRunActuator` records and prints them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Step:
    action: str  # "scale_up", "drain", "scale_down"
    pool: str
    replicas: int  # the pool's replica count after the step (drain: instances to drain)

    def describe(self) -> str:
        if self.action == "drain":
            return f"drain {self.replicas} instance(s) of pool {self.pool}"
        return f"set pool {self.pool} to {self.replicas} replica(s)"


class Actuator(Protocol):
    """What applying a plan needs from a platform.

    current_replicas: the replica count of every pool the actuator manages.
    drain(pool, count): stop sending new requests to `count` instances of `pool` (the
        router's `draining` flag); True once they hold no in-flight requests.
    set_replicas(pool, replicas): set the pool's size (Kubernetes: the Deployment's scale
        subresource), removing only drained instances when it shrinks.
    """

    def current_replicas(self) -> Mapping[str, int]: ...

    def drain(self, pool: str, count: int) -> bool: ...

    def set_replicas(self, pool: str, replicas: int) -> None: ...


def plan_steps(current: Mapping[str, int], target: Mapping[str, int]) -> list[Step]:
    """Steps from `current` to `target` replicas (pools absent from `target` go to 0)."""
    pools = sorted(set(current) | set(target))
    ups = [Step("scale_up", p, target.get(p, 0)) for p in pools if target.get(p, 0) > current.get(p, 0)]
    downs: list[Step] = []
    for pool in pools:
        have, want = current.get(pool, 0), target.get(pool, 0)
        if want < have:
            downs.append(Step("drain", pool, have - want))
            downs.append(Step("scale_down", pool, want))
    return ups + downs


def apply_plan(actuator: Actuator, target: Mapping[str, int]) -> list[Step]:
    """Carry out `plan_steps`; a scale-down waits for its drain (the actuator says when a
    drain is complete; one that is not is left for the next reconcile). Returns the steps done."""
    done: list[Step] = []
    drained: set[str] = set()
    for step in plan_steps(actuator.current_replicas(), target):
        if step.action == "drain":
            if actuator.drain(step.pool, step.replicas):
                drained.add(step.pool)
                done.append(step)
            continue
        if step.action == "scale_down" and step.pool not in drained:
            continue
        actuator.set_replicas(step.pool, step.replicas)
        done.append(step)
    return done


@dataclass(slots=True)
class DryRunActuator:
    """Changes nothing: records the steps and the commands an operator would run."""

    replicas: dict[str, int] = field(default_factory=dict)
    deployment_prefix: str = "tokenyard-"
    namespace: str = "default"
    commands: list[str] = field(default_factory=list)

    def current_replicas(self) -> Mapping[str, int]:
        return dict(self.replicas)

    def drain(self, pool: str, count: int) -> bool:
        self.commands.append(f"# drain {count} instance(s) of {pool}: the router's Admin gRPC DrainInstance; "
                             f"wait until their in-flight requests finish")
        return True

    def set_replicas(self, pool: str, replicas: int) -> None:
        self.commands.append(f"kubectl -n {self.namespace} scale deployment/{self.deployment_prefix}{pool} "
                             f"--replicas={replicas}")
        self.replicas[pool] = replicas
