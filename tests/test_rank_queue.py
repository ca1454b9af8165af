"""Shortest-predicted-first queue order and its starvation guard (scheduler/rank_queue.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.queue_orders import build_queue_policy
from scheduler.queueing import (
    QUEUE_POLICIES,
    QUEUE_SORTS,
    QueuedRequest,
    QueuePolicyError,
    QueueSort,
)
from scheduler.rank_queue import CLASS_STRIDE, LearnedRankPriority, LearnedRankSort
from scheduler.types import RequestInfo, SloClass

INTERACTIVE = SloClass("interactive", 500, 50, priority=0)
BATCH = SloClass("batch", 60_000, 500, priority=2)


def _item(seq: int, rank: float | None, enqueued_s: float, slo: SloClass | None = None) -> QueuedRequest:
    info = RequestInfo(request_id=f"r{seq}", model="m", input_tokens=100 + seq, predicted_rank=rank,
                       arrival_s=enqueued_s)
    return QueuedRequest(request=info, slo_class=slo, enqueued_s=enqueued_s, seq=seq)


def _drive(sort: QueueSort, arrivals: list[tuple[float, float]], releases: list[float]) -> list[tuple[QueuedRequest, float]]:
    """A reference admission queue: arrivals (time, rank) join; at each release time the
    smallest key leaves and every earlier arrival still queued counts one more pass-over."""
    pending = sorted(arrivals, key=lambda p: p[0])  # seq = order into the queue
    queue: list[QueuedRequest] = []
    out: list[tuple[QueuedRequest, float]] = []
    seq = 0
    for now in sorted(releases):
        while pending and pending[0][0] <= now:
            t, r = pending.pop(0)
            queue.append(_item(seq, r, t))
            seq += 1
        if not queue:
            continue
        chosen = min(queue, key=lambda q: sort.key(q, now))
        queue.remove(chosen)
        for other in queue:
            if other.seq < chosen.seq:
                other.passed_over += 1
        out.append((chosen, now))
    return out


def test_registered_by_name() -> None:
    assert QUEUE_SORTS["learned_rank"] is LearnedRankSort
    assert QUEUE_POLICIES["learned_rank"] is LearnedRankPriority
    assert "input_length" in QUEUE_SORTS and "input_length" in QUEUE_POLICIES
    policy = build_queue_policy({"learned_rank": {"max_wait_s": 5}})
    assert isinstance(policy, LearnedRankPriority) and policy.max_wait_s == 5.0


@pytest.mark.parametrize("params, message", [
    ({"max_wait_s": -1}, "max_wait_s"),
    ({"max_wait_s": "soon"}, "max_wait_s"),
    ({"rank_span": 0}, "rank_span"),
    ({"missing_rank": float("nan")}, "missing_rank"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_parameters_say_what(params: dict[str, object], message: str) -> None:
    with pytest.raises(QueuePolicyError, match=message):
        build_queue_policy({"learned_rank": params})
    with pytest.raises((QueuePolicyError, TypeError), match=message):
        LearnedRankSort(**params)  # type: ignore[arg-type]


def test_shortest_predicted_first_then_arrival() -> None:
    sort = LearnedRankSort(max_wait_s=None)
    items = [_item(0, 6.0, 0.0), _item(1, 2.0, 1.0), _item(2, 4.0, 2.0), _item(3, 2.0, 3.0)]
    order = [q.seq for q in sorted(items, key=lambda q: sort.key(q, 10.0))]
    assert order == [1, 3, 2, 0]


def test_missing_rank_sorts_as_the_configured_value() -> None:
    sort = LearnedRankSort(max_wait_s=None, missing_rank=3.0)
    items = [_item(0, None, 0.0), _item(1, 2.0, 1.0), _item(2, 4.0, 2.0)]
    assert [q.seq for q in sorted(items, key=lambda q: sort.key(q, 5.0))] == [1, 0, 2]


def test_slo_class_precedes_starvation_and_rank() -> None:
    sort = LearnedRankSort(max_wait_s=1.0)
    starved_batch = _item(0, 1.0, 0.0, BATCH)  # waited 100 s, shortest
    fresh_interactive = _item(1, 9.0, 99.0, INTERACTIVE)
    assert sort.key(fresh_interactive, 100.0) < sort.key(starved_batch, 100.0)


def test_time_guard_promotes_the_oldest() -> None:
    sort = LearnedRankSort(max_wait_s=10.0)
    long_old = _item(0, 8.0, 0.0)
    short_new = _item(1, 1.0, 5.0)
    assert sort.key(short_new, 9.0) < sort.key(long_old, 9.0)  # not yet starved
    assert sort.key(long_old, 10.0) < sort.key(short_new, 10.0)  # starved: promoted


def test_count_guard_promotes_after_k_passes() -> None:
    sort = LearnedRankSort(max_wait_s=None, max_passed_over=3)
    long_old = _item(0, 8.0, 0.0)
    long_old.passed_over = 2
    assert sort.key(_item(1, 1.0, 1.0), 5.0) < sort.key(long_old, 5.0)
    long_old.passed_over = 3
    assert sort.key(long_old, 5.0) < sort.key(_item(1, 1.0, 1.0), 5.0)


_arrivals = st.lists(st.tuples(st.floats(0, 100), st.floats(0, 10)), min_size=1, max_size=40)
_releases = st.lists(st.floats(0, 200), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(_arrivals, _releases, st.floats(0.5, 50))
def test_time_guard_bounds_overtaking(arrivals: list[tuple[float, float]], releases: list[float], max_wait_s: float) -> None:
    """Nobody who arrived later is released after a request has waited max_wait_s."""
    released = _drive(LearnedRankSort(max_wait_s=max_wait_s), arrivals, releases)
    when = {q.seq: t for q, t in released}
    for q, t in released:
        for other, t_other in released:
            if other.seq > q.seq and t_other < t:  # a later arrival went first
                assert t_other < q.enqueued_s + max_wait_s
    assert len(when) == len(released)


@settings(max_examples=150, deadline=None)
@given(_arrivals, _releases, st.integers(1, 8))
def test_count_guard_bounds_passes(arrivals: list[tuple[float, float]], releases: list[float], k: int) -> None:
    for q, _ in _drive(LearnedRankSort(max_wait_s=None, max_passed_over=k), arrivals, releases):
        assert q.passed_over <= k


def test_without_guard_a_long_request_starves() -> None:
    """The guard matters: pure SJF keeps passing a long request over while short ones come."""
    arrivals = [(0.0, 9.0)] + [(0.1 + 0.5 * k, 1.0) for k in range(100)]  # 2 arrive per release
    releases = [1.0 + k for k in range(50)]
    pure = _drive(LearnedRankSort(max_wait_s=None), arrivals, releases)
    guarded = _drive(LearnedRankSort(max_wait_s=5.0), arrivals, releases)
    pure_long = [t for q, t in pure if q.seq == 0]
    guarded_long = [t for q, t in guarded if q.seq == 0]
    assert guarded_long == [5.0]
    assert pure_long == []


# ---------------------------------------------------------------------------- engine priority
@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e3), st.floats(-5, 30), st.floats(-5, 30), st.floats(0.5, 600))
def test_priority_aging_bounds_overtaking(a_s: float, gap_s: float, rank_a: float, rank_b: float, max_wait_s: float) -> None:
    """A request is overtaken only by same-class requests arriving < max_wait_s after it."""
    policy = LearnedRankPriority(max_wait_s=max_wait_s)
    first = RequestInfo("a", "m", 10, predicted_rank=rank_a, arrival_s=a_s)
    later = RequestInfo("b", "m", 10, predicted_rank=rank_b, arrival_s=a_s + max_wait_s + 0.002 + gap_s)
    assert policy.priority(first, None, a_s) < policy.priority(later, None, later.arrival_s)


@given(st.floats(0, 20), st.floats(0, 20))
def test_priority_without_guard_is_rank_order(rank_a: float, rank_b: float) -> None:
    policy = LearnedRankPriority(max_wait_s=None)
    pa = policy.priority(RequestInfo("a", "m", 1, predicted_rank=rank_a, arrival_s=5.0), None, 5.0)
    pb = policy.priority(RequestInfo("b", "m", 1, predicted_rank=rank_b, arrival_s=1.0), None, 5.0)
    if rank_a < rank_b - 1e-3:
        assert pa < pb
    assert isinstance(pa, int)


def test_priority_class_precedence_and_shorter_first() -> None:
    policy = LearnedRankPriority(max_wait_s=30.0)
    now = 1000.0
    short = RequestInfo("s", "m", 1, predicted_rank=2.0, arrival_s=now)
    long = RequestInfo("l", "m", 1, predicted_rank=8.0, arrival_s=now)
    assert policy.priority(short, None, now) < policy.priority(long, None, now)
    assert policy.priority(long, INTERACTIVE, now) < policy.priority(short, BATCH, now)
    assert policy.priority(long, INTERACTIVE, now) < CLASS_STRIDE
