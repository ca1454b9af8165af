"""Engine load signals: scrape vLLM's `/metrics`, or follow the Worker `Status` stream.

Every `scrape_interval_s` each instance without a gRPC address is scraped for
`vllm:num_requests_running`, `vllm:num_requests_waiting`, the KV-cache usage
(`vllm:kv_cache_usage_perc`, or the deprecated `vllm:gpu_cache_usage_perc` that older
vLLM versions export instead) and the KV geometry (`vllm:cache_config_info`'s
`num_gpu_blocks` and `block_size` labels). Instances with a `grpc_address` get a
`router.worker_client.WorkerClient` subscription instead, which pushes snapshots.
Between scrapes the registry's router-side in-flight counts (bumped on every request start
and end) keep bursts balanced.

The parser reads only the lines it needs (a vLLM /metrics page has hundreds) so that a
scrape of a large fleet stays cheap on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.metrics import RouterMetrics
from router.proxy import PoolSet, UpstreamError
from router.registry import InstanceRegistry

log = logging.getLogger(__name__)

# Used when an engine exports its KV usage fraction but not its block count: the usage
# is then mapped onto this many blocks, so usage-based scorers work while the KV-room
# filter (which needs real block counts) treats the instance as roomy.
UNKNOWN_KV_BLOCKS = 1_000_000
MAX_SCRAPES_PER_S = 200.0
# A vLLM /metrics page is tens of KB; a page past this is an engine fault, not load data.
MAX_METRICS_BYTES = 4 << 20


@dataclass(slots=True)
class EngineLoad:
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    kv_blocks_total: int | None = None
    block_size_tokens: int | None = None


def _value(line: str) -> float:
    """The sample's value; a value that is not a finite number >= 0 is malformed here."""
    value = float(line.rsplit(" ", 1)[1]) if "}" not in line else float(line.rsplit("}", 1)[1].split()[0])
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a load value: {value}")
    return value


def _label(line: str, name: str) -> str | None:
    start = line.find(name + '="')
    if start < 0:
        return None
    start += len(name) + 2
    return line[start:line.index('"', start)]


def parse_vllm_metrics(text: str) -> EngineLoad:
    """Read the load fields from a Prometheus text page (current and deprecated names)."""
    load = EngineLoad()
    current_kv: float | None = None
    old_kv: float | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            if name == "vllm:num_requests_running":
                load.running = (load.running or 0) + int(_value(line))
            elif name == "vllm:num_requests_waiting":
                load.waiting = (load.waiting or 0) + int(_value(line))
            elif name == "vllm:kv_cache_usage_perc":
                current_kv = max(current_kv or 0.0, _value(line))
            elif name == "vllm:gpu_cache_usage_perc":
                old_kv = max(old_kv or 0.0, _value(line))
            elif name == "vllm:cache_config_info":
                blocks = _label(line, "num_gpu_blocks")
                size = _label(line, "block_size")
                if blocks and blocks.isdigit():
                    load.kv_blocks_total = int(blocks)
                if size and size.isdigit():
                    load.block_size_tokens = int(size)
        except (ValueError, IndexError):
            continue  # one malformed sample does not void the page
    load.kv_usage = current_kv if current_kv is not None else old_kv
    return load


class LoadMonitor:
    """Keeps every instance's load fresh in the registry (scrapes and Worker streams)."""

    def __init__(self, registry: InstanceRegistry, metrics: RouterMetrics, *, interval_s: float = 0.25,
                 timeout_s: float = 1.0, pools: PoolSet | None = None, worker_token: str | None = None) -> None:
        self.registry = registry
        self.worker_token = worker_token  # sent on every Worker stream (tokenyard/worker_auth.py)
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.pools = pools or PoolSet(connect_timeout_s=timeout_s)
        self._task: asyncio.Task[None] | None = None
        self._workers: dict[str, object] = {}  # instance id -> WorkerClient

    def apply(self, instance_id: str, load: EngineLoad) -> None:
        total = load.kv_blocks_total
        used = None
        if load.kv_usage is not None:
            if total is None:
                total = UNKNOWN_KV_BLOCKS
            used = int(round(load.kv_usage * total))
        self.registry.update_load(instance_id, running=load.running, waiting=load.waiting,
                                  kv_blocks_used=used, kv_blocks_total=total,
                                  block_size_tokens=load.block_size_tokens, now_s=time.monotonic())

    async def scrape_once(self, instance_id: str, url: str) -> bool:
        try:
            response = await self.pools.get(url).request("GET", "/metrics", headers_timeout_s=self.timeout_s)
            body = await response.read_limited(MAX_METRICS_BYTES, self.timeout_s)
            if response.status != 200:
                raise UpstreamError("protocol", f"/metrics answered {response.status}")
        except (UpstreamError, ValueError) as exc:
            self.metrics.scrape_errors.labels(instance_id).inc()
            log.debug("load scrape failed", extra={"instance": instance_id, "error": str(exc)})
            return False
        self.apply(instance_id, parse_vllm_metrics(body.decode("utf-8", "replace")))
        return True

    async def _sync_workers(self) -> None:
        """One Worker stream per instance that has a gRPC address; none for the others."""
        wanted = {r.instance_id: r.grpc_address for r in self.registry.records() if r.grpc_address}
        for iid in list(self._workers):
            if iid not in wanted:
                client = self._workers.pop(iid)
                await client.stop()  # type: ignore[attr-defined]
        for iid, address in wanted.items():
            if iid in self._workers or address is None:
                continue
            from router.worker_client import WorkerClient

            found = self.registry.find(iid)
            if found is None:
                continue
            client = WorkerClient(address, found[1], interval_ms=max(10, int(self.interval_s * 1000)),
                                  mark_unhealthy_on_loss=False, router_draining=self._drained_by_router(iid),
                                  token=self.worker_token)
            client.start()
            self._workers[iid] = client

    def _drained_by_router(self, instance_id: str) -> Callable[[], bool]:
        def drained() -> bool:
            found = self.registry.find(instance_id)
            return found is not None and found[0].draining

        return drained

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._sync_workers()
            except Exception:
                log.exception("starting Worker status streams failed")
            targets = [(r.instance_id, r.url) for r in self.registry.records() if not r.grpc_address]
            if targets:
                await asyncio.gather(*(self.scrape_once(iid, url) for iid, url in targets), return_exceptions=True)
            elapsed = time.monotonic() - started
            # A large fleet is scraped less often rather than eating the event loop: at most
            # MAX_SCRAPES_PER_S pages a second (a vLLM page is tens of KB of text); between
            # scrapes the router-side in-flight counts keep the picture current.
            interval_s = max(self.interval_s, len(targets) / MAX_SCRAPES_PER_S)
            await asyncio.sleep(max(0.0, interval_s - elapsed))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="load-scrapes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in self._workers.values():
            with contextlib.suppress(Exception):
                await client.stop()  # type: ignore[attr-defined]
        self._workers.clear()
        self.pools.close()
