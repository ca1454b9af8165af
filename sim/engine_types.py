"""The engine core's data: its config, a request with its progress, a batch, a step's output.

Shared by the step path (sim/engine_core.py) and the fast path (sim/engine_fast.py);
import them from sim/engine_core.py, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EngineConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs" or "priority" (lower priority value runs earlier)
    max_model_len: int | None = None  # defaults to the model's max context
    num_kv_blocks: int | None = None  # defaults to the engine model's KV capacity
    # Under `priority`: preempt the lowest-priority running request to admit a waiting one
    # of higher priority when KV blocks run out, as vLLM V0's priority scheduler does
    # (`_schedule_priority_preemption`). Off, the engine admits as vLLM V1 does: the
    # waiting loop stops at the first request that does not fit, and only a running
    # request that must grow preempts.
    admit_preemption: bool = False

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise EngineConfigError(
                f"scheduling_policy: expected 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.admit_preemption and self.scheduling_policy != "priority":
            raise EngineConfigError(
                "admit_preemption: preempts a lower-priority running request to admit a waiting one, "
                f"so it needs scheduling_policy 'priority', got {self.scheduling_policy!r}"
            )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    SUSPENDED = "suspended"  # out of the batch for a migration's stop-and-copy, KV blocks kept
    MIGRATED = "migrated"  # released here: it runs on another engine now


@dataclass(slots=True, eq=False)
class EngineRequest:
    """A request inside the engine, with its progress."""

    request_id: str
    prompt_tokens: int
    output_tokens: int  # how many tokens this request will generate (>= 1)
    arrival_s: float = 0.0
    priority: int = 0
    prefix_hashes: tuple[int, ...] = ()
    prefix_block_tokens: int = 16  # prompt tokens covered by each prefix hash

    status: RequestStatus = RequestStatus.WAITING
    computed_tokens: int = 0  # tokens whose KV is in the cache
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    own_blocks: int = 0  # KV blocks held privately
    shared_hashes: list[int] = field(default_factory=list)  # prefix-cache entries referenced
    _seq: int = 0
    _run_pos: int = 0  # order of admission into the running queue
    # The engine's fast path (see EngineCore.schedule_fast): while `_in_cohort`, the
    # progress fields above are stale and generated_tokens is `_gen_base + engine tick`.
    _in_cohort: bool = False
    _gen_base: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens that exist for this request: the prompt and what it generated so far."""
        return self.prompt_tokens + self.generated_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_tokens - self.computed_tokens > 1 or self.generated_tokens == 0


@dataclass(slots=True)
class Batch:
    """One iteration: which requests compute how many tokens, and what it costs."""

    scheduled: list[tuple[EngineRequest, int]]
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    prefill_attention_pairs: float
    duration_s: float
    preempted: list[EngineRequest]
    # A `schedule_fast` batch: `scheduled` lists only the requests outside the engine's
    # decoding cohort; this many cohort members also decode one token each (-1: a
    # `schedule()` batch, where `scheduled` lists everyone). `tick`: the engine step it is.
    cohort_decodes: int = -1
    tick: int = -1

    @property
    def empty(self) -> bool:
        return not self.scheduled and self.cohort_decodes <= 0


@dataclass(slots=True)
class StepOutput:
    """What one completed iteration produced."""

    tokens: list[EngineRequest]  # requests that emitted one new token (in batch order; on the
    # fast path only those outside the decoding cohort are listed)
    first_tokens: list[EngineRequest]  # subset: emitted their first token
    finished: list[EngineRequest]  # in running order
