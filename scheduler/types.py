"""The values decisions are made from and made of: requests, instance load, decisions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

# (priority, running requests) pairs, by priority, of the classes with requests running
# (scheduler/priority_headroom.py reads them).
RunningByPriority = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the scheduler knows about one request when it must place it."""

    request_id: str
    model: str
    input_tokens: int
    max_output_tokens: int | None = None
    tenant: str = "default"
    slo_class: str = "default"
    session_id: str | None = None
    prefix_hashes: tuple[int, ...] = ()  # hashes of the prompt's leading KV blocks
    predicted_rank: float | None = None  # higher = predicted longer output
    p_small_ok: float | None = None  # predicted probability the small tier's answer suffices
    arrival_s: float = 0.0


@dataclass(slots=True)
class InstanceState:
    """Load snapshot of one engine instance, as the driver last saw it.

    `router_inflight` is the driver's own count of requests it sent and has not seen
    finish; it is updated on every start and end, so it is fresh between scrapes.
    """

    instance_id: str
    model: str
    gpu: str = "unknown"
    pool: str = "default"
    tp: int = 1
    url: str = ""
    healthy: bool = True
    draining: bool = False
    # Cordoned by an operator: no new requests (or migrations in), running ones stay;
    # unlike draining it moves nothing away and is no step of a scale-down.
    cordoned: bool = False
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    block_size_tokens: int = 16
    tokens_in_flight: int = 0
    router_inflight: int = 0
    # KV blocks the queued (waiting) requests need to be admitted: the queued demand that
    # `kv_blocks_used` does not show. None: the driver does not know it (a vLLM /metrics
    # scrape); a scorer then estimates it from `waiting`.
    kv_blocks_queued: int | None = None
    # Running requests per priority class (lower runs earlier): what the priority headroom
    # of virtual usage counts (scheduler/priority_headroom.py). None: the driver does not
    # know it (a vLLM /metrics scrape); no headroom is counted then.
    running_by_priority: RunningByPriority | None = None
    updated_s: float = 0.0
    # Prompt tokens/s the driver has dispatched to the instance, as of `prefill_rate_at_s`
    # (an exponentially decayed rate: scheduler/prefill_rate.py reads and updates it).
    prefill_tokens_per_s: float = 0.0
    prefill_rate_at_s: float = 0.0

    @property
    def kv_usage(self) -> float:
        if self.kv_blocks_total <= 0:
            return 0.0
        return self.kv_blocks_used / self.kv_blocks_total

    @property
    def kv_blocks_free(self) -> int:
        return max(0, self.kv_blocks_total - self.kv_blocks_used)

    @property
    def outstanding(self) -> int:
        """Best estimate of requests on the instance: the larger of scraped and router-side."""
        scraped = self.running + self.waiting
        return scraped if scraped > self.router_inflight else self.router_inflight


@dataclass(frozen=True, slots=True)
class SloClass:
    name: str
    ttft_slo_ms: float
    tpot_slo_ms: float
    priority: int = 0  # lower runs earlier (vLLM convention)
    sheddable: bool = False  # under overload its requests may be refused with 429 + Retry-After
    queue_timeout_ms: float | None = None  # longest wait in the router's admission queue
    stall_timeout_ms: float | None = None  # longest gap between tokens before a stream is cut

    @property
    def stall_timeout_s(self) -> float | None:
        """`stall_timeout_ms` in seconds (what the router's stream relay reads)."""
        return None if self.stall_timeout_ms is None else self.stall_timeout_ms / 1000.0


class RankedScores(Sequence[tuple[str, float]]):
    """(instance id, score) pairs in decision order, built only when first read.

    A decision's scores explain it (logs, tests); placing a request never reads them, so
    `DispatchPolicy.decide` hands over its ids, totals and order and the pairs are made on
    demand. Compares equal to the tuple of the same pairs."""

    __slots__ = ("_ids", "_scores", "_order", "_pairs")

    def __init__(self, ids: Sequence[str], scores: Sequence[float], order: Sequence[int]) -> None:
        self._ids = ids
        self._scores = scores
        self._order = order
        self._pairs: tuple[tuple[str, float], ...] | None = None

    def pairs(self) -> tuple[tuple[str, float], ...]:
        if self._pairs is None:
            ids, scores = self._ids, self._scores
            self._pairs = tuple([(ids[k], scores[k]) for k in self._order])
        return self._pairs

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, index: int) -> tuple[str, float]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[str, float], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, float] | tuple[tuple[str, float], ...]:
        return self.pairs()[index]

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self.pairs())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankedScores):
            return self.pairs() == other.pairs()
        if isinstance(other, tuple):
            return self.pairs() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.pairs())

    def __repr__(self) -> str:
        return repr(self.pairs())


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a decision came out as it did: each candidate's normalised score per scorer, its
    weighted total, and the parts that made the decision (in decision order)."""

    profile: str
    picker: str
    weights: tuple[tuple[str, float], ...]  # (scorer name, weight)
    candidates: tuple[tuple[str, float, tuple[float, ...]], ...]  # (id, total, per-scorer scores)
    window: int = 0  # candidates scored (0: the whole model group)

    def to_dict(self, limit: int = 16) -> dict[str, object]:
        """A JSON-ready summary of the first `limit` candidates (bounded for headers)."""
        names = [name for name, _ in self.weights]
        return {
            "profile": self.profile,
            "picker": self.picker,
            "weights": dict(self.weights),
            "window": self.window,
            "candidates": [
                {"id": iid, "total": round(total, 6), "scores": dict(zip(names, (round(s, 6) for s in parts),
                                                                           strict=True))}
                for iid, total, parts in self.candidates[:limit]
            ],
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes: the chosen instance first, then fallbacks in order."""

    instance_ids: tuple[str, ...]
    priority: int = 0
    reason: str = ""
    scores: Sequence[tuple[str, float]] = field(default=())  # a tuple, or RankedScores
    # Per candidate, per scorer: what the total is made of; set only when the driver asks
    # for an explanation (`DispatchPolicy.decide(..., explain=True)`).
    explanation: Explanation | None = None

    @property
    def instance_id(self) -> str:
        return self.instance_ids[0]


class NoInstanceAvailable(LookupError):
    """No instance passed the filters; the message says which filter removed the last ones."""
