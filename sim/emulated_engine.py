"""The emulated engine: the shared engine core run on the real clock, with vLLM's metrics.

`EmulatedEngine` owns one `EngineCore` and an asyncio task that drives it: ask the core
for the next iteration, sleep the iteration's modelled duration (times `time_scale`),
apply it, and hand the tokens that came out to the per-request `RequestHandle`s the HTTP
layer (sim/engine_http.py) streams from. The task idles when there is no work and is
woken by the next request. Several engines can live in one process and one event loop:
each has its own prometheus `CollectorRegistry`.

Timing: an iteration's sleep is measured from the moment it was scheduled, so the
loop's own CPU time is counted inside the modelled duration, not added to it. Timer
overshoot (the event loop waking late) is absorbed by letting the next iteration end on
the modelled schedule, up to `_MAX_CATCH_UP_S` behind; a loop more behind than that is
really overloaded, and the lag shows in `stats()` (loop_lag_*) and in clients' TPOT.

`time_scale` 0 runs iterations back to back with only a yield to the event loop between
them: a zero-latency engine for router benchmarks.

The engine is also a `sim.worker_grpc.WorkerBackend` (`describe`, `load`, `changed`), so
the Worker gRPC service can serve it, and it takes part in live migration: the
`migration_*` methods (sim/engine_migration.py, mixed in) are the engine-side steps
sim/migration_worker.py drives (suspend, resume, release a request; reserve blocks and
adopt a copied request that a client then `attach`es to). If the loop dies, requests in
flight are aborted, `failure` says why, and new requests are refused (`EngineDeadError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

import tokenyard
from scheduler.catalog import Catalog, CatalogError, default_catalog, tensor_parallel_problem
from scheduler.engine_model import EngineModel, factors_from_table, load_factors_file
from sim.engine_core import (
    Batch,
    EngineConfig,
    EngineCore,
    EngineRequest,
    StepOutput,
)
from sim.engine_migration import EngineMigration
from sim.migration_worker import (
    MigrationService,
    RequestKV,
    wire_bytes_per_token,
)
from sim.request_handle import RequestHandle
from sim.textgen import DEFAULT_OUTPUT_LEN_DIST, OutputLengthDist, OutputText
from sim.worker_grpc import (
    ENGINE_KIND_EMULATED,
    EngineDescriptionInfo,
    LoadChangeNotifier,
    LoadInfo,
)

log = logging.getLogger(__name__)

_MAX_CATCH_UP_S = 0.005
_LAG_SAMPLES = 4096  # ring of recent loop-lag samples kept for `stats()`


class EngineRequestError(ValueError):
    """A request the engine cannot take (too long for the KV cache or the context)."""


class EngineDeadError(RuntimeError):
    """The engine loop died; nothing more will be served until a restart."""


@dataclass(frozen=True, slots=True)
class EmulatedEngineConfig:
    """Everything `tokenyard engine` takes, minus the sockets."""

    gpu: str = "A100-80GB"
    model: str = "llama-3-8b"
    tp: int = 1
    served_model_name: str | None = None  # default: the catalog name of `model`
    instance_id: str | None = None  # default: "<model>@<gpu>-<random>"
    engine: EngineConfig = field(default_factory=EngineConfig)
    output_len_dist: str = DEFAULT_OUTPUT_LEN_DIST
    seed: int = 0
    time_scale: float = 1.0
    max_request_body_bytes: int = 16 << 20
    # KV bytes per token a migration copies; None: the model's real figure. Tests and
    # benchmarks scale it down (the copy then stands for a proportionally faster link).
    kv_wire_bytes_per_token: int | None = None
    max_concurrent_migrations: int = 2
    factors_file: str | None = None  # engine-model factors (`tokenyard calibrate --write`); None: packaged

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp: expected a positive integer, got {self.tp}")
        if not self.time_scale >= 0:
            raise ValueError(f"time_scale: expected a number >= 0, got {self.time_scale}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes: expected a positive integer, got {self.max_request_body_bytes}")
        OutputLengthDist.parse(self.output_len_dist)  # raises with the expected forms


_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                      50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


def _one_two_five(limit: int) -> list[float]:
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return buckets
            buckets.append(float(mantissa * scale))
        scale *= 10


class _Histogram:
    """A histogram kept as plain counts, exported at scrape time.

    prometheus_client's Histogram takes a lock and walks its buckets per observation;
    the engine observes every token's inter-token latency, so this is the hot path.
    """

    __slots__ = ("name", "doc", "buckets", "counts", "sum")

    def __init__(self, name: str, doc: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.doc = doc
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def family(self, label_names: list[str], label_values: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=label_names)
        cumulative = 0
        rows: list[tuple[str, float]] = []
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            # prometheus_client.utils has no annotations; it returns the Go-style bucket label.
            rows.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        family.add_metric(label_values, rows, self.sum)
        return family


class _EngineMetrics:
    """vLLM's metric names (v1 engine, current names), labelled model_name and engine.

    Gauges and counters that mirror the core's state are read at scrape time by a
    collector (nothing to update per iteration); latency histograms are observed as
    requests progress.
    """

    def __init__(self, engine: EmulatedEngine, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.labels = {"model_name": engine.served_model_names[0], "engine": "0"}
        max_len = engine.core.max_model_len

        self.histograms: list[_Histogram] = []

        def hist(name: str, doc: str, buckets: Iterable[float]) -> _Histogram:
            histogram = _Histogram(name, doc, buckets)
            self.histograms.append(histogram)
            return histogram

        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS_S)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS_S)
        self.request_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", _ITL_BUCKETS_S,
        )
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _REQUEST_BUCKETS_S)
        self.queue = hist(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", _REQUEST_BUCKETS_S
        )
        self.prefill = hist(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", _REQUEST_BUCKETS_S
        )
        self.decode = hist(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", _REQUEST_BUCKETS_S
        )
        self.prompt_len = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _one_two_five(max_len))
        self.generation_len = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", _one_two_five(max_len)
        )
        self.max_tokens = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", _one_two_five(max_len)
        )
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        )
        # Counters the engine keeps as plain ints (cheaper than Counter.inc per token).
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.request_success = dict.fromkeys(FINISH_REASONS, 0)
        registry.register(_StateCollector(self))


class _StateCollector:
    """Scrape-time view of the core: queue gauges, KV usage, cache and token counters."""

    def __init__(self, metrics: _EngineMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: names are produced at scrape time

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        engine = metrics.engine
        core = engine.core
        names = list(metrics.labels)
        values = list(metrics.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", core.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", core.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            core.kv_blocks_used / core.num_kv_blocks,
        )
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            core.prefix_cache_queries_tokens,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            core.prefix_cache_hits_tokens,
        )
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", core.preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", metrics.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", metrics.generation_tokens_total)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*names, "finished_reason"]
        )
        for reason, count in metrics.request_success.items():
            success.add_metric([*values, reason], count)
        yield success
        config = core.config
        info_labels = {
            **metrics.labels,
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(engine.engine_model.gpu_memory_utilization),
            "num_gpu_blocks": str(core.num_kv_blocks),
            "num_cpu_blocks": "0",
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(info_labels)
        )
        info.add_metric(list(info_labels.values()), 1.0)
        yield info
        for histogram in metrics.histograms:
            yield histogram.family(names, values)


class EmulatedEngine(EngineMigration):
    """An `EngineCore` on the real clock, with request handles and vLLM metrics."""

    def __init__(self, config: EmulatedEngineConfig | None = None, catalog: Catalog | None = None) -> None:
        self.config = config = config or EmulatedEngineConfig()
        catalog = catalog or default_catalog()
        gpu = catalog.gpu(config.gpu)
        model = catalog.model(config.model)
        tp_problem = tensor_parallel_problem(model, config.tp)
        if tp_problem:
            raise CatalogError(tp_problem)
        factors = None
        if config.factors_file:
            factors = factors_from_table(load_factors_file(config.factors_file), gpu)
        self.engine_model = EngineModel(gpu, model, config.tp, factors=factors)
        self.core = EngineCore(self.engine_model, config.engine)
        self.served_model_names: tuple[str, ...] = (config.served_model_name or model.name,)
        self.instance_id = config.instance_id or f"{model.name}@{gpu.name}-{uuid.uuid4().hex[:8]}"
        self.output_len_dist = OutputLengthDist.parse(config.output_len_dist)
        self.time_scale = config.time_scale
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = _EngineMetrics(self, self.registry)
        self.created_s = int(time.time())
        self.draining = False
        self.failure: str | None = None  # why the engine loop died, if it did
        self._notifier = LoadChangeNotifier()
        self.kv_wire_bytes_per_token = wire_bytes_per_token(config.kv_wire_bytes_per_token or model.kv_bytes_per_token)
        self.migration = MigrationService(self, max_concurrent=config.max_concurrent_migrations)
        self._kv: dict[str, RequestKV] = {}  # KV bytes of requests that migrated in
        self._attachable: dict[str, RequestHandle] = {}  # adopted, waiting for their client
        self._description = EngineDescriptionInfo(
            instance_id=self.instance_id,
            model=model.name,
            gpu=gpu.name,
            tensor_parallel=config.tp,
            num_kv_blocks=self.core.num_kv_blocks,
            block_size_tokens=self.core.config.block_size,
            kv_bytes_per_token=model.kv_bytes_per_token,
            max_model_len=self.core.max_model_len,
            engine_kind=ENGINE_KIND_EMULATED,
            engine_version=tokenyard.__version__,
            incarnation_id=uuid.uuid4().hex,
            max_num_seqs=self.core.config.max_num_seqs,
            max_num_batched_tokens=self.core.config.max_num_batched_tokens,
            labels={"served_model_name": self.served_model_names[0], "time_scale": f"{config.time_scale:g}"},
            kv_transfer_backends=("grpc-inline",),
            max_concurrent_migrations=config.max_concurrent_migrations,
        )
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Loop statistics, for benchmarks (`stats()`).
        self._model_clock_s = 0.0  # sum of modelled iteration durations (unscaled)
        self._modelled_itl_sum_s = 0.0
        self._modelled_itl_count = 0
        self._lag_samples: list[float] = []
        self._lag_index = 0
        self._iterations = 0
        self._busy_wall_s = 0.0

    # ------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self.failure = None
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"engine-loop {self.instance_id}")
        log.info(
            "emulated engine started",
            extra={
                "instance_id": self.instance_id, "model": self.engine_model.name,
                "num_kv_blocks": self.core.num_kv_blocks, "max_model_len": self.core.max_model_len,
                "time_scale": self.time_scale,
            },
        )

    async def stop(self) -> None:
        await self.migration.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.abort_all()

    def abort_all(self) -> int:
        """Abort every request in the engine (shutdown); returns how many there were."""
        request_ids = list(self._handles)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    # ------------------------------------------------------------- requests
    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def block_size(self) -> int:
        return self.core.config.block_size

    def new_request_id(self) -> str:
        return f"{uuid.uuid4().hex[:16]}-{next(self._ids)}"

    def choose_output_tokens(
        self, max_tokens: int, seed: int, *, ignore_eos: bool = False, min_tokens: int = 0,
        fixed: int | None = None,
    ) -> tuple[int, str]:
        """How many tokens a request generates, and its finish reason ("length" or "stop")."""
        if ignore_eos:
            wanted = max_tokens
        elif fixed is not None:
            wanted = fixed
        else:
            wanted = self.output_len_dist.sample(random.Random(seed))
        wanted = max(wanted, min_tokens, 1)
        if wanted >= max_tokens:
            return max_tokens, "length"
        return wanted, "stop"

    def submit(
        self,
        *,
        prompt_tokens: int,
        output_tokens: int,
        max_tokens: int,
        text_seed: int,
        priority: int = 0,
        prefix_hashes: tuple[int, ...] = (),
        request_id: str | None = None,
        text_position: int = 0,
    ) -> RequestHandle:
        """Queue a request; the returned handle yields its tokens as iterations complete.
        `text_position`: a continuation of a request that already produced that many
        tokens elsewhere (its text goes on from there)."""
        if self._wake is None or not self.running:
            if self.failure is not None:
                raise EngineDeadError(f"engine {self.instance_id}: the engine loop died: {self.failure}")
            raise RuntimeError(f"engine {self.instance_id} is not started; await engine.start() first")
        loop_now = time.monotonic()
        request_id = request_id or self.new_request_id()
        if request_id in self._handles:
            raise EngineRequestError(f"request id {request_id!r} is already in the engine")
        req = EngineRequest(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            arrival_s=loop_now,
            priority=priority,
            prefix_hashes=prefix_hashes,
            prefix_block_tokens=self.block_size,
        )
        try:
            self.core.add_request(req)
        except ValueError as exc:
            raise EngineRequestError(str(exc)) from None
        handle = RequestHandle(
            request_id, prompt_tokens, output_tokens, max_tokens, priority, loop_now,
            OutputText.resumed(text_seed, text_position) if text_position else OutputText(text_seed),
        )
        handle.text_seed = text_seed
        handle.text_offset = text_position
        self._handles[request_id] = handle
        self.metrics.max_tokens.observe(max_tokens)
        self._wake.set()
        self._notifier.notify()
        return handle

    def has_request(self, request_id: str) -> bool:
        return request_id in self._handles

    @property
    def requests_in_flight(self) -> int:
        """Requests the engine holds, waiting or running (for draining and tests)."""
        return len(self._handles)

    def abort(self, request_id: str) -> bool:
        """Drop a request (client gone); True if it was still in the engine."""
        handle = self._handles.pop(request_id, None)
        self._attachable.pop(request_id, None)
        self._kv.pop(request_id, None)
        self.core.abort(request_id)
        if handle is None:
            return False
        handle.done = True
        handle.finish_reason = "abort"
        handle.finish_s = time.monotonic()
        self.metrics.request_success["abort"] += 1
        handle._wake()
        if self._wake is not None:
            self._wake.set()  # the loop may be waiting on blocked work that now fits
        self._notifier.notify()
        return True

    # ------------------------------------------------------------- views
    def load(self) -> LoadInfo:
        """The current load (the Worker service's Status payload)."""
        return LoadInfo.of_core(
            self.core, self.draining, migrations_out=self.migration.active("source"),
            migrations_in=self.migration.active("destination"),
            kv_blocks_reserved_for_migration=self.migration.reserved_blocks(),
        )

    def notify_load_changed(self) -> None:
        self._notifier.notify()


    def describe(self) -> EngineDescriptionInfo:
        """Fixed facts of this instance (the Worker service's Describe answer)."""
        return self._description

    async def changed(self, seen_version: int, timeout_s: float) -> int:
        """Wait for a load change after `seen_version` (WorkerBackend); returns the version."""
        return await self._notifier.wait(seen_version, timeout_s)

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self._notifier.notify()

    def stats(self) -> dict[str, Any]:
        """Loop statistics for benchmarks: modelled inter-token time and event-loop lag."""
        lags = sorted(self._lag_samples)

        def pct(q: float) -> float:
            return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else 0.0

        return {
            "iterations": self._iterations,
            "model_clock_s": self._model_clock_s,
            "busy_wall_s": self._busy_wall_s,
            "time_scale": self.time_scale,
            "modelled_itl_sum_s": self._modelled_itl_sum_s * self.time_scale,
            "modelled_itl_count": self._modelled_itl_count,
            "modelled_itl_mean_s": (
                self._modelled_itl_sum_s * self.time_scale / self._modelled_itl_count
                if self._modelled_itl_count else 0.0
            ),
            "loop_lag_p50_s": pct(0.5),
            "loop_lag_p99_s": pct(0.99),
            "loop_lag_max_s": lags[-1] if lags else 0.0,
            "loop_lag_samples": len(lags),
        }

    def reset_stats(self) -> None:
        self._modelled_itl_sum_s = 0.0
        self._modelled_itl_count = 0
        self._lag_samples = []
        self._lag_index = 0
        self._iterations = 0
        self._busy_wall_s = 0.0

    # ------------------------------------------------------------- the loop
    def _record_lag(self, lag_s: float) -> None:
        if len(self._lag_samples) < _LAG_SAMPLES:
            self._lag_samples.append(lag_s)
        else:
            self._lag_samples[self._lag_index] = lag_s
            self._lag_index = (self._lag_index + 1) % _LAG_SAMPLES

    async def _run(self) -> None:
        try:
            await self._iterate()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A dead loop must not leave clients waiting forever: fail what is in flight,
            # and let /health and new requests say so (as vLLM does on EngineDeadError).
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("engine loop died", extra={"instance_id": self.instance_id})
            self.abort_all()

    async def _iterate(self) -> None:
        assert self._wake is not None
        wake = self._wake
        core = self.core
        clock = time.monotonic
        scale = self.time_scale
        deadline = clock()
        while True:
            if not core.has_work():
                wake.clear()
                await wake.wait()
                deadline = clock()
                continue
            start = clock()
            batch = core.schedule()
            if not batch.scheduled:
                # Work waits on KV blocks that only an arrival or an abort can change.
                wake.clear()
                await wake.wait()
                deadline = clock()
                continue
            if scale > 0:
                target = max(deadline, start - _MAX_CATCH_UP_S) + batch.duration_s * scale
                delay = target - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                    now = clock()
                    self._record_lag(now - target)
                else:
                    await asyncio.sleep(0)
                    now = clock()
                    self._record_lag(now - target)
                deadline = target
            else:
                await asyncio.sleep(0)
                now = clock()
            out = core.complete(batch, now)
            self._deliver(batch, out, start, now)
            self._busy_wall_s += now - start
            self._notifier.notify()

    def _deliver(self, batch: Batch, out: StepOutput, start: float, now: float) -> None:
        handles = self._handles
        metrics = self.metrics
        self._iterations += 1
        self._model_clock_s += batch.duration_s
        model_clock = self._model_clock_s
        metrics.iteration_tokens.observe(batch.prefill_tokens + batch.decode_seqs)
        for req, _ in batch.scheduled:
            handle = handles.get(req.request_id)
            if handle is not None and handle.scheduled_s is None:
                handle.scheduled_s = start
        itl = metrics.itl
        itl_sum = 0.0
        itl_count = 0
        for req in out.tokens:
            handle = handles.get(req.request_id)
            if handle is None:
                continue
            if handle.first_token_s is None:
                handle.first_token_s = now
                handle.cached_prompt_tokens = req.cached_prompt_tokens
                metrics.ttft.observe(now - handle.arrival_s)
                metrics.prompt_tokens_total += handle.prompt_tokens
            else:
                itl.observe(now - handle.last_token_s)  # type: ignore[operator]
                itl_sum += model_clock - handle._model_last_s
                itl_count += 1
            handle._model_last_s = model_clock
            handle.last_token_s = now
            handle.emitted += 1
            if handle.wake_per_token:
                handle._wake()
        metrics.generation_tokens_total += len(out.tokens)
        self._modelled_itl_sum_s += itl_sum
        self._modelled_itl_count += itl_count
        kv_store = self._kv
        for req in out.finished:
            if kv_store:
                kv_store.pop(req.request_id, None)
            handle = handles.pop(req.request_id, None)
            if handle is None:
                continue
            handle.done = True
            handle.finish_s = now
            handle.finish_reason = "length" if handle.output_tokens >= handle.max_tokens else "stop"
            self._observe_finished(handle)
            handle._wake()

    def _observe_finished(self, handle: RequestHandle) -> None:
        metrics = self.metrics
        metrics.request_success[handle.finish_reason or "stop"] += 1
        finish = handle.finish_s or 0.0
        first = handle.first_token_s or finish
        scheduled = handle.scheduled_s or handle.arrival_s
        metrics.e2e.observe(finish - handle.arrival_s)
        metrics.queue.observe(scheduled - handle.arrival_s)
        metrics.prefill.observe(first - scheduled)
        metrics.decode.observe(finish - first)
        metrics.prompt_len.observe(handle.prompt_tokens)
        metrics.generation_len.observe(handle.emitted)
        if handle.emitted > 1:
            metrics.request_tpot.observe((finish - first) / (handle.emitted - 1))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request finished",
                extra={
                    "instance_id": self.instance_id, "request_id": handle.request_id,
                    "prompt_tokens": handle.prompt_tokens, "cached_prompt_tokens": handle.cached_prompt_tokens,
                    "output_tokens": handle.emitted, "finish_reason": handle.finish_reason,
                    "priority": handle.priority, "ttft_s": round(first - handle.arrival_s, 6),
                    "e2e_s": round(finish - handle.arrival_s, 6),
                },
            )

