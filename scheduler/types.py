"""The values decisions are made from and made of: requests, instance load, decisions."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    block_size_tokens: int = 16
    tokens_in_flight: int = 0
    router_inflight: int = 0
    updated_s: float = 0.0

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


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes: the chosen instance first, then fallbacks in order."""

    instance_ids: tuple[str, ...]
    priority: int = 0
    reason: str = ""
    scores: tuple[tuple[str, float], ...] = field(default=())

    @property
    def instance_id(self) -> str:
        return self.instance_ids[0]


class NoInstanceAvailable(LookupError):
    """No instance passed the filters; the message says which filter removed the last ones."""
