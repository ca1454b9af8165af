"""tokenyard/loop_metrics.py: the lock-free request-path metrics expose exactly what
prometheus_client's own counters, gauges and histograms expose for the same updates."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenyard.loop_metrics import LoopCounter, LoopGauge, LoopHistogram, LoopMetrics

BUCKETS = (0.00001, 0.001, 0.0025, 0.5, 1, 60)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the `_created` timestamps, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_the_exposition_equals_prometheus_clients_own() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    hot = LoopMetrics()
    counter = hot.add(LoopCounter("t_requests", "requests", ["tenant", "code"]))
    hist = hot.add(LoopHistogram("t_seconds", "time", ["model"], buckets=BUCKETS))
    plain_hist = hot.add(LoopHistogram("t_decide_seconds", "decide", buckets=BUCKETS))
    gauge = hot.add(LoopGauge("t_inflight", "in flight"))
    hot.register(ours)
    ref_counter = Counter("t_requests", "requests", ["tenant", "code"], registry=theirs)
    ref_hist = Histogram("t_seconds", "time", ["model"], buckets=BUCKETS, registry=theirs)
    ref_plain = Histogram("t_decide_seconds", "decide", buckets=BUCKETS, registry=theirs)
    ref_gauge = Gauge("t_inflight", "in flight", registry=theirs)
    rng = random.Random(7)
    for _ in range(2000):
        tenant, code = rng.choice(["a", "b"]), rng.choice(["200", "502"])
        counter.labels(tenant, code).inc()
        ref_counter.labels(tenant, code).inc()
        # Values on the bucket bounds too: `le` is inclusive in both.
        value = rng.choice([*BUCKETS, 0.0, 0.0004, 0.7, 100.0, rng.random()])
        model = rng.choice(["m1", "m2"])
        hist.labels(model).observe(value)
        ref_hist.labels(model).observe(value)
        plain_hist.observe(value / 10)
        ref_plain.observe(value / 10)
        if rng.random() < 0.5:
            gauge.inc()
            ref_gauge.inc()
        else:
            gauge.dec()
            ref_gauge.dec()
    ours_samples, theirs_samples = samples(generate_latest(ours)), samples(generate_latest(theirs))
    assert ours_samples == pytest.approx(theirs_samples)
    assert len(ours_samples) > 30


def test_wrong_label_counts_and_negative_increments_are_errors() -> None:
    counter = LoopCounter("t_x", "x", ["a", "b"])
    with pytest.raises(ValueError, match=r"t_x: expected 2 label value\(s\) \(a, b\), got 1"):
        counter.labels("only-one")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match="at least one finite bucket"):
        LoopHistogram("t_h", "h", buckets=[float("inf")])


def test_router_metrics_keep_their_names_on_the_one_registry() -> None:
    from router.metrics import RouterMetrics

    metrics = RouterMetrics()
    metrics.request_done("acme", "llama", 200)
    metrics.child(metrics.first_byte, "acme", "llama").observe(0.003)
    metrics.inflight.inc()
    text = metrics.render().decode()
    assert 'tokenyard_router_requests_total{code="200",model="llama",tenant="acme"} 1.0' in text
    assert "tokenyard_router_first_byte_seconds_count" in text and "tokenyard_router_inflight 1.0" in text
    # prometheus_client's own metrics are still there, on the same registry.
    assert "# TYPE tokenyard_router_retries_total counter" in text
