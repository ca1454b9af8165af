"""Queue policies and admission-queue orders built by name from the policy document.

`scheduler.queueing` holds the registries and the built-in orders; modules such as
`scheduler.rank_queue` register more. This module imports all of them, so a name in a
policy document resolves whichever module defines it, and none of those modules imports
another to register.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from scheduler import rank_queue as _rank_queue  # noqa: F401  (registers learned_rank, input_length)
from scheduler.queueing import QUEUE_POLICIES, QUEUE_SORTS, QueuePolicy, QueuePolicyError, QueueSort


def build_queue_policy(spec: str | Mapping[str, Any] | None, where: str = "queue.policy") -> QueuePolicy:
    """`fcfs`, or `{slo_priority: {unknown_priority: 1}}`; None means fcfs."""
    return _build_named(QUEUE_POLICIES, "queue policy", spec, where)


def build_queue_sort(spec: str | Mapping[str, Any] | None, where: str = "queue.sort") -> QueueSort:
    """`fcfs`, or `{slo_priority: {unknown_priority: 1}}`; None means fcfs."""
    return _build_named(QUEUE_SORTS, "queue sort", spec, where)


_Part = TypeVar("_Part")


def _build_named(registry: Mapping[str, type[_Part]], kind: str, spec: str | Mapping[str, Any] | None,
                 where: str) -> _Part:
    """A registered part given as `name` or `{name: {param: value}}` (None: fcfs)."""
    if spec is None:
        spec = "fcfs"
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and len(spec) == 1:
        name, raw = next(iter(spec.items()))
        if raw is not None and not isinstance(raw, Mapping):
            raise QueuePolicyError(f"{where}.{name}: expected a mapping of parameters, got {raw!r}")
        params = dict(raw or {})
    else:
        raise QueuePolicyError(f"{where}: expected a {kind} name or {{name: params}}, got {spec!r}")
    cls = registry.get(str(name))
    if cls is None:
        raise QueuePolicyError(f"{where}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise QueuePolicyError(f"{where}: {exc}") from exc
