"""Capacity tables by simulation: the max request rate one instance sustains within an SLO.

For one (GPU type, model, tp, engine config) and one length bucket, the simulator replays
a Poisson stream on a single instance whose lengths are drawn from the bucket's own
requests (a sample of its (input, output) pairs; a histogram without requests gives one
representative shape). A bucket's mean shape alone is not enough: KV-cache time per
request grows with the square of the output length, so a wide output bucket planned at
its mean overloaded its pool in verification (Azure conv, 68% attainment at a planned 90%
load); with the bucket's own lengths it met the SLO. the capacity is the highest rate at which at least
`attainment` of the requests meet both the TTFT and the TPOT SLO. The rate is found by
doubling until the SLO breaks, then bisecting (monotone: more load never lowers latency).
A shape no instance can serve even alone (too long for the context, a model that does not
fit, an SLO below the unloaded latency) has capacity 0, and its unloaded TTFT/TPOT are
kept so that errors can say how far the SLO would have to move.

Results are cached on disk, one JSON file per entry keyed by a hash of every input (GPU
and model specs, the perf factors, tp, engine config, shape, SLO, attainment, stream
length, seed, and `CAPACITY_VERSION`), so a changed input is a new entry, never a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.catalog import GpuSpec, ModelSpec
from scheduler.engine_model import PerfFactors, factors_for
from scheduler.types import SloClass
from sim.cluster import ClusterSpec, PoolSpec
from sim.engine_core import EngineConfig
from sim.report import summarize, write_json
from sim.simulator import simulate
from sim.workload import TraceRequest

CAPACITY_VERSION = 1  # bump when the method changes: old cache entries stop matching
_MAX_RATE_RPS = 1024.0
_MIN_RATE_RPS = 1.0 / 64
_BISECT_STEPS = 6  # ~1.5% relative precision after the doubling bracket
# A stream must last long enough for queues to build at high rates (300 requests at
# 1000 req/s are 0.3 s: they all fit in one batch and "meet" any SLO).
_MIN_STREAM_S = 60.0
_MAX_STREAM_REQUESTS = 6000


@dataclass(frozen=True, slots=True)
class CapacityQuery:
    gpu: GpuSpec
    model: ModelSpec
    tp: int
    shapes: tuple[tuple[int, int], ...]  # (input, output) tokens the stream draws from
    slo: SloClass
    attainment: float = 0.95
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    gpu_memory_utilization: float = 0.9
    stream_requests: int = 300
    seed: int = 0
    factors: PerfFactors | None = None  # None: the packaged fit for the GPU (`--factors` sets it)

    def key(self) -> str:
        body = {
            "version": CAPACITY_VERSION,
            "gpu": dataclasses.asdict(self.gpu),
            "factors": (self.factors or factors_for(self.gpu)).as_dict(),
            "model": dataclasses.asdict(self.model),
            "tp": self.tp,
            "shapes": [list(s) for s in self.shapes],
            "slo": [self.slo.ttft_slo_ms, self.slo.tpot_slo_ms],
            "attainment": self.attainment,
            "engine": dataclasses.asdict(self.engine),
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "stream": [self.stream_requests, self.seed],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Capacity:
    rate_rps: float  # 0: cannot meet the SLO even unloaded
    unloaded_ttft_ms: float  # math.inf: cannot run the shape at all
    unloaded_tpot_ms: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"rate_rps": self.rate_rps, "reason": self.reason,
                "unloaded_ttft_ms": None if math.isinf(self.unloaded_ttft_ms) else self.unloaded_ttft_ms,
                "unloaded_tpot_ms": None if math.isinf(self.unloaded_tpot_ms) else self.unloaded_tpot_ms}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Capacity:
        def num(v: Any) -> float:
            return math.inf if v is None else float(v)

        return cls(float(raw["rate_rps"]), num(raw["unloaded_ttft_ms"]), num(raw["unloaded_tpot_ms"]),
                   str(raw.get("reason", "")))


def _cluster(query: CapacityQuery) -> ClusterSpec:
    pool = PoolSpec("one", query.gpu, query.model, query.tp, 1, query.engine, query.gpu_memory_utilization,
                    factors=query.factors)
    return ClusterSpec(pools=(pool,), dispatch={}, slo_classes={"default": query.slo},
                       default_model=query.model.name)


def _stream(query: CapacityQuery, rate_rps: float) -> list[TraceRequest]:
    rng = random.Random(query.seed)
    count = min(_MAX_STREAM_REQUESTS, max(query.stream_requests, math.ceil(rate_rps * _MIN_STREAM_S)))
    t = 0.0
    out = []
    for k in range(count):
        t += rng.expovariate(rate_rps)
        n_in, n_out = query.shapes[rng.randrange(len(query.shapes))]
        out.append(TraceRequest(f"c{k}", t, n_in, n_out))
    return out


def _attainment(cluster: ClusterSpec, requests: list[TraceRequest]) -> float:
    summary = summarize(simulate(cluster, requests), dict(cluster.slo_classes))
    value = summary["slo"]["default"]["both_attainment"]
    return float(value or 0.0)


def measure(query: CapacityQuery) -> Capacity:
    """Simulate (no cache); see the module docstring."""
    pool = _cluster(query).pools[0]
    if pool.engine_model().kv_capacity_blocks(query.engine.block_size) <= 0:
        return Capacity(0.0, math.inf, math.inf, f"{query.model.name} does not fit on {query.gpu.name} x tp {query.tp}")
    if not query.shapes:
        raise ValueError("capacity query: expected at least one (input, output) shape")
    max_len = query.engine.max_model_len or query.model.max_context_tokens
    longest = max(query.shapes, key=sum)
    if sum(longest) > max_len:
        return Capacity(0.0, math.inf, math.inf, f"{longest[0]}+{longest[1]} tokens exceed the context of {max_len}")
    cluster = _cluster(query)
    n_in = round(sum(s[0] for s in query.shapes) / len(query.shapes))
    n_out = round(sum(s[1] for s in query.shapes) / len(query.shapes))
    alone = summarize(simulate(cluster, [TraceRequest("alone", 0.0, n_in, n_out)]), dict(cluster.slo_classes))
    ttft_ms = float(alone["ttft_p50_ms"] or 0.0)
    tpot_ms = float(alone["tpot_p50_ms"] or 0.0)
    if not _attainment(cluster, _stream(query, _MIN_RATE_RPS)) >= query.attainment:
        return Capacity(0.0, ttft_ms, tpot_ms, "misses the SLO even unloaded")
    good, bad = _MIN_RATE_RPS, _MIN_RATE_RPS * 2
    while bad <= _MAX_RATE_RPS and _attainment(cluster, _stream(query, bad)) >= query.attainment:
        good, bad = bad, bad * 2
    if bad > _MAX_RATE_RPS:
        return Capacity(good, ttft_ms, tpot_ms)
    for _ in range(_BISECT_STEPS):
        mid = math.sqrt(good * bad)
        if _attainment(cluster, _stream(query, mid)) >= query.attainment:
            good = mid
        else:
            bad = mid
    return Capacity(good, ttft_ms, tpot_ms)


class CapacityCache:
    """Capacity per query, from `folder` when measured before (None: no disk cache)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.hits = 0
        self.misses = 0

    def get(self, query: CapacityQuery) -> Capacity:
        path = self.folder / f"{query.key()}.json" if self.folder is not None else None
        if path is not None and path.exists():
            try:
                found = Capacity.from_dict(json.loads(path.read_text()))
                self.hits += 1
                return found
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged entry is measured again and rewritten
        self.misses += 1
        result = measure(query)
        if path is not None:
            write_json(result.as_dict(), path)
        return result


def capacity_table(queries: Sequence[CapacityQuery], cache: CapacityCache,
                   progress: Callable[[int], None] | None = None) -> list[Capacity]:
    """`cache.get` of every query, in order; `progress(1)` after each (a tqdm update)."""
    out = []
    for query in queries:
        out.append(cache.get(query))
        if progress is not None:
            progress(1)
    return out


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenyard" / "capacity"
