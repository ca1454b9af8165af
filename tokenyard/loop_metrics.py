"""Request-path metrics without a lock per update: counters, a gauge and histograms kept as
plain numbers by the one thread that updates them (the event loop), exposed through
prometheus_client's registry as an ordinary collector (same names, types and text format).

Why not prometheus_client's own Counter/Histogram on the request path: each update takes a
`threading.Lock`, checks observability, and a histogram walks its buckets in Python. One
router request makes 6 updates (requests, attempts, first byte, decide time, in flight up
and down). Measured on the 2-core box (timeit, best of 7; docs/benchmarks.md, issue #17):
prometheus_client 0.78 us per counter `inc`, 1.1-1.7 us per histogram `observe`; here
0.12 and 0.23 us (a float add; a `bisect` and two adds), ~5 us less per request.

The price: updates are not thread-safe. Only the event loop's thread may update these
(the router's request path, health and load monitors, the gRPC servers on the same
loop); a scrape from another thread reads a consistent-enough snapshot (each number is
read once, so a bucket may be one observation ahead of the count; Prometheus tolerates
that, as it does for prometheus_client's own unlocked reads across children).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # finite upper bounds, ascending; the last count is +Inf's
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, i.e. the bucket `le` that takes it.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family:
    """A metric name with label names and one child per label value tuple."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}

    def _new_child(self) -> object:
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> object:
        found = self._children.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label value(s) "
                                 f"({', '.join(self.labelnames)}), got {len(values)}")
            found = self._children[values] = self._new_child()
        return found

    def items(self) -> list[tuple[tuple[str, ...], object]]:
        return list(self._children.items())


_FamilyT = TypeVar("_FamilyT", bound=_Family)


class LoopCounter(_Family):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._unlabelled = _CounterChild() if not self.labelnames else None

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, *values: str) -> _CounterChild:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, _CounterChild)
        return child

    def inc(self, amount: float = 1.0) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).inc()"
        self._unlabelled.inc(amount)

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        children = self.items() if self.labelnames else [((), self._unlabelled)]
        for values, child in children:
            assert isinstance(child, _CounterChild)
            family.add_metric(list(values), child.value, created=child.created)
        return family


class LoopGauge(_Family):
    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._unlabelled = _GaugeChild() if not self.labelnames else None

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def labels(self, *values: str) -> _GaugeChild:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, _GaugeChild)
        return child

    def inc(self, amount: float = 1.0) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).inc()"
        self._unlabelled.value += amount

    def dec(self, amount: float = 1.0) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).dec()"
        self._unlabelled.value -= amount

    def set(self, value: float) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).set()"
        self._unlabelled.value = float(value)

    def unlabelled(self) -> _GaugeChild:
        """The one child of a gauge without labels, for a caller to keep (a bound child:
        `value` updated in place, no method call per update)."""
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...)"
        return self._unlabelled

    def collect(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        children = self.items() if self.labelnames else [((), self._unlabelled)]
        for values, child in children:
            assert isinstance(child, _GaugeChild)
            family.add_metric(list(values), child.value)
        return family


class LoopHistogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Iterable[float]) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(float(b))))
        if not bounds:
            raise ValueError(f"{self.name}: expected at least one finite bucket bound")
        self.bounds = bounds
        self._unlabelled = _HistogramChild(bounds) if not self.labelnames else None

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, _HistogramChild)
        return child

    def observe(self, amount: float) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).observe()"
        self._unlabelled.observe(amount)

    def unlabelled(self) -> _HistogramChild:
        """The one child of a histogram without labels, for a caller to keep (one call per
        observation instead of two)."""
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...)"
        return self._unlabelled

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        children = self.items() if self.labelnames else [((), self._unlabelled)]
        for values, child in children:
            assert isinstance(child, _HistogramChild)
            counts = list(child.counts)  # one read: the cumulative counts below agree with each other
            buckets = []
            cumulative = 0
            for bound, count in zip((*child.bounds, math.inf), counts, strict=True):
                cumulative += count
                buckets.append((_bound_text(bound), float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)
        return family


def _bound_text(bound: float) -> str:
    """The `le` label exactly as prometheus_client's own histograms write it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class LoopMetrics(Collector):
    """Loop-local metric families, collected on scrape: `add` them, then `register` once."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def add(self, family: _FamilyT) -> _FamilyT:
        self.families.append(family)
        return family

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)  # after every add: the registry checks the names once, here

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        for family in self.families:
            yield family.collect()  # type: ignore[attr-defined]

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        return self.collect()
