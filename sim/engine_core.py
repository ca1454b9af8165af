"""One engine core, two clocks: the continuous-batching iteration logic of a vLLM-like engine.

The core owns the waiting and running queues, admission, chunked prefill and preemption
(by recomputation, as vLLM v1 does); the KV block pool and prefix cache it allocates
from are sim/kv_cache.py's. For live migration (docs/migration.md) a running request can
be suspended (out of the batch, its blocks kept), resumed, or released, and a request
copied from another engine adopted into the running queue from its exact token. It has no
clock: a driver asks `schedule()` for the next iteration, waits the iteration's
`duration_s` (a real `asyncio.sleep` in the emulated engine, a heap event in the
simulator), then calls `complete(batch, end_s)` to apply it and learn which tokens came
out and which requests finished.

Fast-forward (for the simulator): when a just-scheduled batch decodes (or finishes the
prompts of) the same sequences that later steps will decode, and nothing can change it
for a while, `plan_decode_run(batch, start_s)` returns a `DecodeRun` of k
steps whose durations are an arithmetic series (the engine model's pure-decode step time
is linear in context tokens), and `complete_run(run, end_s)` applies all k steps at once,
leaving exactly the state k `complete`/`schedule` rounds would have left. The run can be
cut short (`DecodeRun.truncate`) when a new request arrives, and reports the load an
observer would see at any instant inside it (`kv_blocks_used_at`, `tokens_in_flight_at`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from scheduler.engine_model import EngineModel
from sim.kv_cache import CacheEntry, KVBlockManager


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

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise EngineConfigError(
                f"scheduling_policy: expected 'fcfs' or 'priority', got {self.scheduling_policy!r}"
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


@dataclass(slots=True)
class DecodeRun:
    """`steps` iterations of an unchanged set of sequences, applied at once by `complete_run`.

    Step 0 is `batch`, already scheduled: decodes, and possibly prompts whose last chunk it
    computes (they emit their first token at its end). Every later step decodes one token
    for every sequence, each one token longer than the step before, so step j >= 1 lasts
    `second_step_s + (j - 1) * step_growth_s`. Within the run no request finishes before
    the last step, none is admitted or preempted, and the KV blocks the sequences grow
    into come from free blocks (no prefix-cache eviction), so the state after the run is
    a closed-form function of `steps`.
    """

    batch: Batch
    start_s: float
    steps: int
    first_step_s: float
    second_step_s: float
    step_growth_s: float
    sequences: int  # the running requests, all decoding from step 1 on
    block_size: int
    kv_blocks_used_start: int  # while step 0 runs
    tokens_in_flight_start: int  # while step 0 runs
    # [k]: sequences that can add at most k tokens after step 0 before they need a new KV
    # block (0 <= k < block_size; cumulative counts)
    _slack_at_most: list[int] = field(default_factory=list)
    # For the current `steps` (reset by `truncate`): elapsed_s(steps), blocks_allocated(steps - 1).
    _elapsed_s: float | None = None
    _later_blocks: int | None = None

    def elapsed_s(self, steps: int) -> float:
        """Time from the run's start to the end of its `steps`-th step."""
        if steps <= 0:
            return 0.0
        later = steps - 1
        return self.first_step_s + later * self.second_step_s + self.step_growth_s * (later * (later - 1) / 2.0)

    @property
    def end_s(self) -> float:
        return self.start_s + self.total_s

    @property
    def total_s(self) -> float:
        """Duration of the whole run (all `steps`)."""
        if self._elapsed_s is None:
            self._elapsed_s = self.elapsed_s(self.steps)
        return self._elapsed_s

    @property
    def later_blocks(self) -> int:
        """KV blocks the run grows into after step 0 (all `steps`)."""
        if self._later_blocks is None:
            self._later_blocks = self.blocks_allocated(self.steps - 1)
        return self._later_blocks

    def step_end_s(self, steps: int) -> float:
        """Absolute end time of the `steps`-th step (the same float drivers schedule)."""
        return self.start_s + self.elapsed_s(steps)

    def steps_done_by(self, now_s: float) -> int:
        """How many of the run's steps have ended by `now_s` (an end at `now_s` counts)."""
        elapsed = now_s - self.start_s - self.first_step_s
        d1, g = self.second_step_s, self.step_growth_s
        if elapsed < 0.0:
            later = -1  # the fix-up below settles rounding at the first step's end
        elif g <= 0.0:
            later = int(elapsed / d1) if d1 > 0 else self.steps
        else:
            b = d1 - g / 2.0
            later = int((-b + math.sqrt(b * b + 2.0 * g * elapsed)) / g)
        m = max(0, min(1 + later, self.steps))
        while m < self.steps and self.step_end_s(m + 1) <= now_s:
            m += 1
        while m > 0 and self.step_end_s(m) > now_s:
            m -= 1
        return m

    def blocks_allocated(self, steps_started: int) -> int:
        """KV blocks the sequences grew into during steps 1..`steps_started`.

        A sequence with `slack` spare tokens needs ceil((m - slack) / bs) blocks in m steps
        (none if m <= slack). With m - 1 = q * bs + r that is q + 1 when slack <= r, else q:
        so the total is q * sequences + (sequences with slack <= r)."""
        if steps_started <= 0:
            return 0
        q, r = divmod(steps_started - 1, self.block_size)
        return q * self.sequences + self._slack_at_most[r]

    def kv_blocks_used_at(self, steps_done: int) -> int:
        """Blocks in use while step `steps_done` runs (its blocks are already allocated)."""
        in_progress = min(steps_done, self.steps - 1)
        return self.kv_blocks_used_start + self.blocks_allocated(in_progress)

    def tokens_in_flight_at(self, steps_done: int) -> int:
        return self.tokens_in_flight_start + self.sequences * min(steps_done, self.steps)

    def truncate(self, steps: int) -> None:
        """Stop the run after `steps` steps (something outside changed the next batch)."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"a run of {self.steps} steps cannot be cut to {steps}")
        if steps != self.steps:
            self.steps = steps
            self._elapsed_s = None
            self._later_blocks = None


# EngineModel -> {decode batch size: its pure decode step line (or () if none)}, shared by
# every core of the same model object (the simulator gives a pool's instances one).
_DECODE_LINES: weakref.WeakKeyDictionary[object, dict[int, tuple[float, float] | tuple[()]]] = (
    weakref.WeakKeyDictionary()
)


def _decode_line(model: EngineModel, n: int, max_model_len: int) -> tuple[float, float] | tuple[()]:
    """(t0, slope) of a pure decode step of n sequences, checked against the model's
    `iteration_time_s` over the context range; () if the model does not promise a line
    (then every step is stepped, never fast-forwarded)."""
    model_step = getattr(model, "decode_step_linear_s", None)
    if model_step is None:
        return ()
    t0, slope = model_step(n)
    for context in (n, n * 1024, n * max_model_len):
        expected = model.iteration_time_s(0, n, context, 0.0)
        if abs(t0 + slope * context - expected) > 1e-9 * max(1.0, expected):
            return ()
    return t0, slope


class EngineCore:
    """Continuous batching with KV blocks, prefix caching, chunked prefill and preemption."""

    def __init__(self, model: EngineModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        capacity = self.config.num_kv_blocks
        if capacity is None:
            capacity = model.kv_capacity_blocks(self.config.block_size)
        if capacity <= 0:
            raise EngineConfigError(
                f"{model.name}: weights leave no room for a KV cache "
                f"({model.gpu.memory_gib} GiB x tp {model.tp}); use a larger GPU or tensor parallelism"
            )
        self.num_kv_blocks = capacity
        self.max_model_len = self.config.max_model_len or model.model.max_context_tokens
        # The KV block pool and prefix cache (sim/kv_cache.py); this class decides who
        # holds how many blocks, the manager counts them.
        self.kv = KVBlockManager(capacity, self.config.block_size, self.config.enable_prefix_caching)
        self._waiting: list[tuple[tuple[float, ...], EngineRequest]] = []  # heap
        self.running: list[EngineRequest] = []
        self._seq = itertools.count()
        self.requests: dict[str, EngineRequest] = {}
        self.suspended: dict[str, EngineRequest] = {}  # by request id (also in `requests`)
        # Counters, exported by drivers as metrics.
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hits_tokens = 0
        self.preemptions_total = 0
        self.iterations_total = 0
        # plan_decode_run: (t0, slope) of a pure decode step by batch size (the model's
        # `decode_step_linear_s`, checked once per size by `_decode_line`).
        self._decode_lines = _DECODE_LINES.setdefault(model, {})
        self._run_counter = itertools.count()
        self._by_priority = self.config.scheduling_policy == "priority"
        # The fast path's decoding cohort (see "fast path" below).
        self._in_step = False  # a schedule_fast batch is in flight
        self._tick = 0  # fast-path steps completed
        self._last_step_end_s = 0.0
        self._reset_cohort()

    def _reset_cohort(self) -> None:
        """No cohort: the step path's state (every request's progress in its fields)."""
        self._fast = False  # the cohort is formed (every running request is in it or in _prefilling)
        self._prefilling: list[EngineRequest] = []  # running, not in the cohort (running order)
        self._finish_heap: list[tuple[int, int, EngineRequest]] = []  # (finish tick, run pos, req)
        self._residue_counts = [0] * self.config.block_size  # members by (computed - tick) % bs
        self._cohort_base_sum = 0  # sum of members' computed - tick
        self._cohort_size = 0
        self._cohort_last_pos = -1  # latest admission position among members (an upper bound)

    def _cohort_tokens(self) -> int:
        """Tokens of the cohort's members (prompt + generated = computed + 1 each)."""
        return self._cohort_base_sum + self._cohort_size * (self._tick + 1)

    # ----------------------------------------------------------------- queues
    def _wait_key(self, req: EngineRequest) -> tuple[float, ...]:
        if self.config.scheduling_policy == "priority":
            return (float(req.priority), req.arrival_s, float(req._seq))
        return (req.arrival_s, float(req._seq))

    def add_request(self, req: EngineRequest) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in the engine")
        if req.prompt_tokens < 1 or req.output_tokens < 1:
            raise ValueError(
                f"request {req.request_id}: prompt_tokens and output_tokens must be >= 1, "
                f"got {req.prompt_tokens} and {req.output_tokens}"
            )
        if req.prompt_tokens + req.output_tokens > self.max_model_len:
            raise ValueError(
                f"request {req.request_id}: {req.prompt_tokens} prompt + {req.output_tokens} output "
                f"tokens exceed the model's maximum context length of {self.max_model_len}"
            )
        if req.prefix_hashes and req.prefix_block_tokens % self.config.block_size:
            raise ValueError(
                f"request {req.request_id}: prefix_block_tokens ({req.prefix_block_tokens}) must be a "
                f"multiple of the engine's block size ({self.config.block_size})"
            )
        blocks_needed = -(-(req.prompt_tokens + req.output_tokens) // self.config.block_size)
        if blocks_needed > self.num_kv_blocks:
            raise ValueError(
                f"request {req.request_id}: needs {blocks_needed} KV blocks, the engine has "
                f"{self.num_kv_blocks} in all"
            )
        seq = req._seq = next(self._seq)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        key = self._wait_key(req) if self._by_priority else (req.arrival_s, float(seq))
        heapq.heappush(self._waiting, (key, req))

    def abort(self, request_id: str) -> EngineRequest | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        if self._in_step and req.status is RequestStatus.RUNNING:
            raise RuntimeError(f"abort {request_id}: a schedule_fast batch is in flight; complete it first")
        del self.requests[request_id]
        if req.status is RequestStatus.SUSPENDED:
            del self.suspended[request_id]
            self._release(req)
        elif req.status is RequestStatus.RUNNING:
            if req._in_cohort:
                self._leave_cohort(req)
            elif self._fast:
                self._prefilling.remove(req)
            self.running.remove(req)
            self._release(req)
        elif req.status is RequestStatus.WAITING:
            self._waiting = [(k, r) for k, r in self._waiting if r is not req]
            heapq.heapify(self._waiting)
        req.status = RequestStatus.ABORTED
        return req

    # ------------------------------------------------------------- migration
    # The engine-side steps of a live migration (the Worker service drives them,
    # sim/migration_worker.py). The step path only: the fast path is the simulator's,
    # which models a migration by its transfer time instead (sim/migration.py).
    def suspend(self, request_id: str) -> EngineRequest:
        """Take a running request out of the batch, keeping its KV blocks (stop-and-copy).
        A step in flight that scheduled it skips it: it emits no token there."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            raise ValueError(f"suspend {request_id}: not a running request")
        self._leave_fast()
        self.running.remove(req)
        req.status = RequestStatus.SUSPENDED
        self.suspended[request_id] = req
        return req

    def resume(self, request_id: str) -> EngineRequest:
        """Put a suspended request back into the batch (the migration was aborted): it
        continues from the token it stopped at."""
        req = self.suspended.pop(request_id)
        req.status = RequestStatus.RUNNING
        req._run_pos = next(self._run_counter)
        self._leave_fast()
        self.running.append(req)
        return req

    def release_migrated(self, request_id: str) -> EngineRequest:
        """A suspended request now runs elsewhere: free its blocks and forget it."""
        req = self.suspended.pop(request_id)
        del self.requests[request_id]
        self._release(req)
        req.status = RequestStatus.MIGRATED
        return req

    def reserve_blocks(self, blocks: int) -> bool:
        """Set aside KV blocks for an incoming migration; False if they are not free."""
        return self.kv.reserve(blocks)

    def unreserve_blocks(self, blocks: int) -> None:
        self.kv.unreserve(blocks)

    def adopt(self, req: EngineRequest, reserved_blocks: int) -> None:
        """Run a request whose KV was copied here: `req.generated_tokens` are out already
        and `req.computed_tokens` (prompt + generated - 1) have KV. Its blocks come from
        the `reserved_blocks` of its migration; what it does not need goes back to the pool."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in the engine")
        needed = self._blocks_for(req.computed_tokens)
        if needed > reserved_blocks:
            raise ValueError(f"adopt {req.request_id}: needs {needed} KV blocks, {reserved_blocks} reserved")
        if req.generated_tokens < 1 or req.computed_tokens != req.prompt_tokens + req.generated_tokens - 1:
            raise ValueError(f"adopt {req.request_id}: not a decoding request")
        self._leave_fast()
        self.kv.unreserve(needed, to_pool=False)
        self.kv.unreserve(reserved_blocks - needed)
        req.own_blocks = needed
        req.shared_hashes = []
        req._seq = next(self._seq)
        req._run_pos = next(self._run_counter)
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.running.append(req)

    @property
    def head_of_line_blocks(self) -> int:
        """KV blocks the first queued request needs to be admitted (0 if none waits)."""
        if not self._waiting:
            return 0
        head = self._waiting[0][1]
        return -(-(head.num_tokens - head.computed_tokens) // self.config.block_size)

    @property
    def waiting_blocks(self) -> int:
        """KV blocks every queued request needs to be admitted (the queued demand)."""
        bs = self.config.block_size
        return sum(-(-(r.num_tokens - r.computed_tokens) // bs) for _, r in self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    @property
    def kv_blocks_used(self) -> int:
        """Blocks held by requests (cached prefixes nobody references count as free)."""
        return self.kv.used_blocks

    @property
    def free_blocks(self) -> int:
        return self.kv.free_blocks

    @property
    def _evictable_blocks(self) -> int:
        return self.kv.evictable_blocks

    @property
    def _cache(self) -> OrderedDict[int, CacheEntry]:
        return self.kv.cache

    @property
    def tokens_in_flight(self) -> int:
        if self._fast:
            return self._cohort_tokens() + sum(r.num_tokens for r in self._prefilling)
        return sum(r.num_tokens for r in self.running)

    # ------------------------------------------------------------- KV blocks
    # Request-facing wrappers over the block manager (sim/kv_cache.py).
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _shared_blocks(self, req: EngineRequest) -> int:
        return self.kv.shared_blocks(req.shared_hashes)

    def _held_blocks(self, req: EngineRequest) -> int:
        """KV blocks `req` holds: its own and the cached prefix blocks it references."""
        return req.own_blocks + (self.kv.shared_blocks(req.shared_hashes) if req.shared_hashes else 0)

    def _allocate(self, blocks: int) -> bool:
        return self.kv.allocate(blocks)

    def _evict_one(self) -> None:
        self.kv.evict_one()

    def _release(self, req: EngineRequest) -> None:
        self.kv.release(req.own_blocks, req.shared_hashes)
        req.own_blocks = 0

    def _lookup_prefix(self, req: EngineRequest) -> None:
        """On admission: reference the cached leading prefix blocks, skip computing them."""
        if not self.config.enable_prefix_caching or not req.prefix_hashes:
            return
        usable = min(len(req.prefix_hashes), req.prompt_tokens // req.prefix_block_tokens)
        hits = self.kv.lookup(req.prefix_hashes, usable, req.prefix_block_tokens, req.prompt_tokens,
                              req.shared_hashes)
        req.computed_tokens = hits * req.prefix_block_tokens
        req.cached_prompt_tokens = req.computed_tokens

    def _promote_prefix(self, req: EngineRequest) -> None:
        """Move fully computed prompt blocks with a hash from private to shared (cached)."""
        if not self.config.enable_prefix_caching or not req.prefix_hashes:
            return
        done = min(req.computed_tokens, req.prompt_tokens) // req.prefix_block_tokens
        done = min(done, len(req.prefix_hashes))
        per_hash = req.prefix_block_tokens // self.config.block_size
        while len(req.shared_hashes) < done:
            key = req.prefix_hashes[len(req.shared_hashes)]
            self.kv.promote(key, per_hash)
            req.own_blocks -= per_hash
            req.shared_hashes.append(key)

    def _grow(self, req: EngineRequest, new_tokens: int) -> bool:
        """Make sure `req` holds blocks for computed + new tokens."""
        needed = self._blocks_for(req.computed_tokens + new_tokens) - self._held_blocks(req)
        if needed <= 0:
            return True
        if not self._allocate(needed):
            return False
        req.own_blocks += needed
        return True

    def _preempt(self, req: EngineRequest) -> None:
        if req._in_cohort:
            self._leave_cohort(req)
        elif self._fast:
            self._prefilling.remove(req)
        self.running.remove(req)
        self._release(req)
        req.computed_tokens = 0
        req.preemptions += 1
        req.status = RequestStatus.WAITING
        self.preemptions_total += 1
        heapq.heappush(self._waiting, (self._wait_key(req), req))

    def _victim(self) -> EngineRequest:
        """Who is preempted when KV runs out: the lowest priority, then the latest arrival."""
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_s, r._seq))
        return max(self.running, key=lambda r: (r.arrival_s, r._seq))

    # ------------------------------------------------------------- iteration
    def schedule(self) -> Batch:
        """Choose the next iteration's work; call `complete` when it has run."""
        self._leave_fast()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[EngineRequest, int]] = []
        preempted: list[EngineRequest] = []
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            new = min(req.num_tokens - req.computed_tokens, budget)
            while not self._grow(req, new):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            scheduled.append((req, new))
            budget -= new
        # Preempted requests were already scheduled? Drop them from this batch.
        if preempted:
            scheduled = [(r, n) for r, n in scheduled if r.status is RequestStatus.RUNNING]
        else:
            scheduled = self._admit(scheduled, budget, preempted)
        return self._shape(scheduled, preempted)

    def _admit(
        self, scheduled: list[tuple[EngineRequest, int]], budget: int, preempted: list[EngineRequest]
    ) -> list[tuple[EngineRequest, int]]:
        """Admit waiting requests in queue order while seats, token budget and KV blocks
        allow (under priority scheduling, preempting lower-priority running requests).
        Appends to `scheduled` and `preempted`; returns `scheduled` without the victims."""
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            _, req = self._waiting[0]
            if req.computed_tokens == 0 and not req.shared_hashes:
                self._lookup_prefix(req)
            new = min(req.num_tokens - req.computed_tokens, budget)
            if not self._grow(req, new):
                if (
                    self.config.scheduling_policy == "priority"
                    and self.running
                    and self._victim().priority > req.priority
                ):
                    victim = self._victim()
                    self._preempt(victim)
                    preempted.append(victim)
                    scheduled = [(r, n) for r, n in scheduled if r is not victim]
                    continue
                # Not admitted: give back the prefix references taken for it.
                self._release(req)
                req.computed_tokens = 0
                break
            heapq.heappop(self._waiting)
            req.status = RequestStatus.RUNNING
            req._run_pos = next(self._run_counter)
            self.running.append(req)
            if self._fast:
                self._prefilling.append(req)
            if req.prefix_hashes and self.config.enable_prefix_caching:
                # Counted once per admission, as vLLM counts a scheduled request's lookup
                # (a head blocked on KV is looked up again each step, but not counted).
                self.prefix_cache_queries_tokens += req.prompt_tokens
                self.prefix_cache_hits_tokens += req.cached_prompt_tokens
            scheduled.append((req, new))
            budget -= new
        return scheduled

    def _shape(self, scheduled: list[tuple[EngineRequest, int]], preempted: list[EngineRequest]) -> Batch:
        prefill_tokens = 0
        decode_seqs = 0
        context = 0
        pairs = 0.0
        for req, new in scheduled:
            if new == 1 and req.generated_tokens > 0:
                decode_seqs += 1
                context += req.computed_tokens + 1
            else:
                prefill_tokens += new
                pairs += new * (req.computed_tokens + (new + 1) / 2.0)
        duration = self.model.iteration_time_s(prefill_tokens, decode_seqs, context, pairs)
        return Batch(scheduled, prefill_tokens, decode_seqs, context, pairs, duration, preempted)

    def _apply_chunk(
        self, req: EngineRequest, new: int, end_s: float, tokens: list[EngineRequest], first: list[EngineRequest]
    ) -> bool:
        """`req` computed `new` more tokens in a step ending at `end_s`: promote its finished
        prefix blocks, and if that completes its tokens, emit one (appended to `tokens`, and
        to `first` if it is its first). True if it emitted."""
        req.computed_tokens += new
        self._promote_prefix(req)
        if req.computed_tokens < req.prompt_tokens + req.generated_tokens:
            return False
        req.generated_tokens += 1
        req.last_token_s = end_s
        tokens.append(req)
        if req.first_token_s is None:
            req.first_token_s = end_s
            first.append(req)
        return True

    def complete(self, batch: Batch, end_s: float) -> StepOutput:
        """Apply an iteration that ended at `end_s`: advance progress, emit tokens, finish."""
        if batch.cohort_decodes >= 0:
            return self._complete_fast(batch, 1, end_s, end_s, 0)
        if self._fast:
            raise RuntimeError("this batch came from schedule() but the engine is on the fast path")
        self.iterations_total += 1
        tokens: list[EngineRequest] = []
        first: list[EngineRequest] = []
        finished: list[EngineRequest] = []
        for req, new in batch.scheduled:
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the iteration ran
            if not self._apply_chunk(req, new, end_s, tokens, first):
                continue  # a prefill chunk; no token yet
            if req.generated_tokens >= req.output_tokens:
                req.finish_s = end_s
                req.status = RequestStatus.FINISHED
                self.running.remove(req)
                self._release(req)
                del self.requests[req.request_id]
                finished.append(req)
        return StepOutput(tokens, first, finished)

    # ---------------------------------------------------------- fast path
    # The simulator's path: `schedule_fast`, `plan_decode_run`, `complete_run` (and
    # `complete` of a `schedule_fast` batch). Running requests that are decoding form a
    # cohort whose progress is not written into each request every step: a member's
    # generated tokens are `_gen_base + self._tick`, where `_tick` counts fast-path steps
    # (every member decodes one token in every one of them). What a step needs from the
    # cohort comes from aggregates kept as members join and leave: how many there are, the
    # sum of their computed tokens, how many sit at each position inside a KV block (so how
    # many need a new block at the next step), and a heap of the steps at which they finish.
    # So a step, a run and a run cut short cost O(requests that join, leave or prefill),
    # not O(running). `sync()` writes the progress into the requests; `schedule()`,
    # `complete()` of a `schedule()` batch and preemption by KV pressure leave the fast
    # path (writing everything back), and the next `schedule_fast` rejoins it.

    def _join(self, req: EngineRequest, tick: int) -> None:
        """`req` decodes from the step after `tick` on: it holds ceil(computed / bs) blocks
        and computed == prompt + generated - 1."""
        req._in_cohort = True
        gen_base = req.generated_tokens - tick
        req._gen_base = gen_base
        base = req.prompt_tokens + gen_base - 1  # computed tokens - tick, constant while a member
        self._residue_counts[base % self.config.block_size] += 1
        self._cohort_base_sum += base
        self._cohort_size += 1
        if req._run_pos > self._cohort_last_pos:
            self._cohort_last_pos = req._run_pos
        heapq.heappush(self._finish_heap, (req.output_tokens - gen_base, req._run_pos, req))

    def _write_progress(self, req: EngineRequest) -> None:
        """Write a cohort member's progress (tokens, KV blocks, last token time) into it."""
        generated = req._gen_base + self._tick
        if generated != req.generated_tokens:
            req.generated_tokens = generated
            req.last_token_s = self._last_step_end_s
        computed = req.prompt_tokens + generated - 1
        req.computed_tokens = computed
        held_tokens = computed + 1 if self._in_step else computed  # a scheduled step's block is held
        shared = self._shared_blocks(req) if req.shared_hashes else 0
        req.own_blocks = -(-held_tokens // self.config.block_size) - shared

    def _leave_cohort(self, req: EngineRequest) -> None:
        """Take one member out of the cohort (finish, abort, preemption); its progress is written."""
        self._write_progress(req)
        base = req.prompt_tokens + req._gen_base - 1
        self._residue_counts[base % self.config.block_size] -= 1
        self._cohort_base_sum -= base
        self._cohort_size -= 1
        req._in_cohort = False  # its heap entry is now stale (skipped when it comes up)

    def sync(self) -> None:
        """Write the cohort's progress into its requests (for readers of request fields)."""
        if self._fast:
            for req in self.running:
                if req._in_cohort:
                    self._write_progress(req)

    def _enter_fast(self) -> bool:
        """Form the cohort from the running requests; False (and no change) if a decoding
        request holds more KV blocks than its tokens need (then the exact step path runs)."""
        bs = self.config.block_size
        members: list[EngineRequest] = []
        prefilling: list[EngineRequest] = []
        for req in self.running:
            generated = req.generated_tokens
            computed = req.computed_tokens
            if generated > 0 and computed == req.prompt_tokens + generated - 1:
                held = self._held_blocks(req)
                if held != -(-computed // bs):
                    return False
                members.append(req)
            else:
                prefilling.append(req)
        self._fast = True
        self._prefilling = prefilling
        for req in members:
            self._join(req, self._tick)
        return True

    def _leave_fast(self) -> None:
        """Write every member's progress back and dissolve the cohort."""
        if not self._fast:
            return
        if self._in_step:
            raise RuntimeError("a schedule_fast batch is in flight: complete it before stepping")
        for req in self.running:
            if req._in_cohort:
                self._write_progress(req)
                req._in_cohort = False
        self._reset_cohort()

    def schedule_fast(self) -> Batch:
        """The batch `schedule()` would return, with the same state changes, at a cost that
        does not grow with the running decoders (see the fast-path note above).

        The batch's `scheduled` lists only the requests outside the cohort (prefilling
        ones, and those admitted now); `cohort_decodes` members decode one token each.
        Where the exact outcome depends on a per-request walk (preemption because KV ran
        out, a token budget smaller than the decoders), this leaves the fast path and
        returns `schedule()`'s batch. Complete the batch with `complete` (or plan a run on
        it with `plan_decode_run`) before the next `schedule_fast`.
        """
        if not self._fast and not self._enter_fast():
            return self.schedule()
        if self._in_step:
            raise RuntimeError("schedule_fast: the previous batch has not been completed")
        bs = self.config.block_size
        max_budget = self.config.max_num_batched_tokens
        tick = self._tick
        members = self._cohort_size
        prefilling = self._prefilling
        if members > max_budget:
            self._leave_fast()
            return self.schedule()
        budget = max_budget - members
        if (
            prefilling
            and prefilling[0]._run_pos < self._cohort_last_pos
            and budget < sum(r.prompt_tokens + r.generated_tokens - r.computed_tokens for r in prefilling)
        ):
            # Some prompt gets a partial chunk and a decoder comes after it in the running
            # order (not the usual case: prompts are admitted behind the decoders), so who
            # gets the budget depends on a walk in that order: the step path's.
            self._leave_fast()
            return self.schedule()
        need_total = self._residue_counts[-tick % bs] if members else 0
        scheduled: list[tuple[EngineRequest, int]] = []
        growing: list[tuple[EngineRequest, int]] = []
        for req in prefilling:
            if budget <= 0:
                break
            computed = req.computed_tokens
            new = req.prompt_tokens + req.generated_tokens - computed
            if new > budget:
                new = budget
            held = self._held_blocks(req)
            need = -(-(computed + new) // bs) - held
            if need > 0:
                need_total += need
                growing.append((req, need))
            scheduled.append((req, new))
            budget -= new
        kv = self.kv
        if need_total > kv.free_blocks:
            if need_total > kv.free_blocks + kv.evictable_blocks:
                self._leave_fast()  # someone is preempted: the step path decides who
                return self.schedule()
            # The step path evicts cached prefixes (LRU) as each request grows; evicting
            # until the whole growth fits evicts the same entries.
            while kv.free_blocks < need_total:
                kv.evict_one()
        kv.free_blocks -= need_total
        for req, need in growing:
            req.own_blocks += need
        self._in_step = True
        preempted: list[EngineRequest] = []
        if self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            scheduled = self._admit(scheduled, budget, preempted)
        members = self._cohort_size  # fewer if admission preempted a member
        prefill_tokens = 0
        decode_seqs = members
        context = self._cohort_tokens()  # each member decodes with computed + 1 tokens of context
        pairs = 0.0
        for req, new in scheduled:
            if new == 1 and req.generated_tokens > 0:
                decode_seqs += 1
                context += req.computed_tokens + 1
            else:
                prefill_tokens += new
                pairs += new * (req.computed_tokens + (new + 1) / 2.0)
        duration = self.model.iteration_time_s(prefill_tokens, decode_seqs, context, pairs)
        if not scheduled and not members:
            self._in_step = False  # nothing to run (or complete)
        return Batch(scheduled, prefill_tokens, decode_seqs, context, pairs, duration, preempted, members, tick)

    def plan_decode_run(self, batch: Batch, start_s: float, max_steps: int | None = None) -> DecodeRun | None:
        """If `batch` (just returned by `schedule_fast`, starting at `start_s`) begins a
        stretch of steps that all decode the same sequences, describe the longest such
        stretch; None if it is one step (or `batch` came from the step path).

        `batch` itself may also compute the last chunk of some prompts (they join the
        decoding from step 1), provided nothing waits for a seat: with the prefill tokens
        gone from the budget, a waiting request could be admitted in step 1.
        The stretch ends at the first step where a request finishes, or before a step whose
        KV growth would need more than the free blocks (eviction or preemption would follow).
        A waiting request that could not be admitted in a pure-decode `batch` cannot be
        admitted later in the stretch either: nothing frees blocks or seats until a request
        finishes. Only an arrival can change that; the driver then cuts the run short
        (`DecodeRun.truncate`).
        """
        if batch.cohort_decodes < 0 or batch.preempted:
            return None
        n = len(self.running)
        explicit = batch.scheduled
        if n == 0 or len(explicit) + self._cohort_size != n:
            return None  # a prompt got no budget this step
        if batch.prefill_tokens > 0 and self._waiting and n < self.config.max_num_seqs:
            return None
        steps = max_steps if max_steps is not None else 1 << 62
        heap = self._finish_heap
        while heap:  # the first member to finish (stale entries of members gone are dropped)
            finish_tick, pos, req = heap[0]
            if req._in_cohort and req._run_pos == pos:
                if finish_tick - self._tick < steps:
                    steps = finish_tick - self._tick
                break
            heapq.heappop(heap)
        bs = self.config.block_size
        tick = self._tick
        members = self._cohort_size
        # After step 0 a member with residue r has computed r + tick + 1 tokens (mod bs), so
        # its slack is -(r + tick + 1) % bs: slack s holds residue (k - s) % bs with
        # k = -(tick + 1) % bs, i.e. the residue counts from k down, wrapping around.
        k = -(tick + 1) % bs
        residues = self._residue_counts
        by_slack = residues[k::-1] + residues[:k:-1]
        # Tokens of the cohort (computed + 1 each), and the context of step 1 (one more each).
        tokens = self._cohort_tokens()
        context_after_first = tokens + members
        caching = self.config.enable_prefix_caching
        for req, new in explicit:
            generated = req.generated_tokens
            computed = req.computed_tokens
            # Only a prompt's last chunk (it emits a token at the end of step 0), and no
            # prefix blocks to promote into the cache when it completes.
            if computed + new != req.prompt_tokens + generated or (caching and req.prefix_hashes):
                return None
            if req.output_tokens - generated < steps:
                steps = req.output_tokens - generated
            held = self._held_blocks(req)
            slack = held * bs - computed - new
            if slack >= bs:
                return None  # holds more blocks than it needs: not a cohort member later
            by_slack[slack] += 1
            tokens += req.prompt_tokens + generated
            context_after_first += computed + new + 1
        if steps <= 1:
            return None
        line = self._decode_lines.get(n)
        if line is None:
            line = self._decode_lines[n] = _decode_line(self.model, n, self.max_model_len)
        if not line:
            return None
        t0, slope = line
        second = t0 + slope * context_after_first
        run = DecodeRun(
            batch=batch,
            start_s=start_s,
            steps=steps,
            first_step_s=batch.duration_s,
            second_step_s=second,
            step_growth_s=slope * n,
            sequences=n,
            block_size=bs,
            kv_blocks_used_start=self.kv.used_blocks,
            tokens_in_flight_start=tokens,
            _slack_at_most=list(itertools.accumulate(by_slack)),
        )
        free = self.kv.free_blocks
        if run.later_blocks > free:
            lo, hi = 1, steps  # lo fits (step 0 grows nothing more), hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if run.blocks_allocated(mid - 1) <= free:
                    lo = mid
                else:
                    hi = mid
            if lo <= 1:
                return None
            run.truncate(lo)
        return run

    def complete_run(self, run: DecodeRun, end_s: float) -> StepOutput:
        """Apply all `run.steps` steps of a run ending at `end_s`: the state, counters and
        token times are those of as many `complete`/`schedule` rounds. `tokens` and
        `first_tokens` list the requests of step 0 outside the cohort that emitted a token
        (their first, at the end of step 0); `finished`, everyone who finished."""
        steps = run.steps
        first_end_s = end_s if steps == 1 else run.start_s + run.first_step_s
        return self._complete_fast(run.batch, steps, end_s, first_end_s, run.later_blocks)

    def _complete_fast(
        self, batch: Batch, steps: int, end_s: float, first_end_s: float, later_blocks: int
    ) -> StepOutput:
        if batch.empty:
            self.iterations_total += 1
            return StepOutput([], [], [])
        if not self._in_step or batch.tick != self._tick:
            raise RuntimeError("this batch is not the one in flight (complete each batch once, in order)")
        self._in_step = False
        self.iterations_total += steps
        tick1 = self._tick + 1
        self._tick = tick1
        self._last_step_end_s = first_end_s
        tokens: list[EngineRequest] = []
        first: list[EngineRequest] = []
        finished: list[EngineRequest] = []
        running_status = RequestStatus.RUNNING
        irregular = False
        if batch.scheduled:
            bs = self.config.block_size
            for req, new in batch.scheduled:
                if req.status is not running_status:
                    continue  # aborted while the step ran
                if self._apply_chunk(req, new, first_end_s, tokens, first):
                    if req.generated_tokens >= req.output_tokens:
                        finished.append(req)
                        continue
                elif req.generated_tokens == 0 or req.computed_tokens != req.num_tokens - 1:
                    continue  # a prefill chunk
                computed = req.computed_tokens
                # Decoding from the next step on.
                held = self._held_blocks(req)
                if held != -(-computed // bs):
                    irregular = True
                    continue
                self._join(req, tick1)
            self._prefilling = [r for r in self._prefilling if r.status is running_status and not r._in_cohort
                                and r not in finished]
        if steps > 1:
            self._tick += steps - 1
            self._last_step_end_s = end_s
            self.kv.free_blocks -= later_blocks
        heap = self._finish_heap
        tick = self._tick
        explicit_finished = len(finished)
        while heap and heap[0][0] <= tick:
            _, pos, req = heapq.heappop(heap)
            if req._in_cohort and req._run_pos == pos:
                self._leave_cohort(req)
                finished.append(req)
        if explicit_finished and len(finished) > explicit_finished:
            finished.sort(key=lambda r: r._run_pos)  # running order, as stepping reports them
        for req in finished:
            req.last_token_s = end_s
            req.finish_s = end_s
            req.status = RequestStatus.FINISHED
            self.running.remove(req)
            self._release(req)
            del self.requests[req.request_id]
        if irregular:
            self._leave_fast()
        return StepOutput(tokens, first, finished)

    def check_invariants(self) -> None:
        """Raise AssertionError if the block accounting is inconsistent (for tests)."""
        self.sync()
        if self._fast:
            members = [r for r in self.running if r._in_cohort]
            assert [r for r in self.running if not r._in_cohort] == self._prefilling
            bs = self.config.block_size
            residues = [0] * bs
            for r in members:
                base = r.computed_tokens - self._tick
                residues[base % bs] += 1
                assert r.computed_tokens == r.prompt_tokens + r.generated_tokens - 1
            assert residues == self._residue_counts, (residues, self._residue_counts)
            assert sum(r.computed_tokens - self._tick for r in members) == self._cohort_base_sum
            assert len(members) == self._cohort_size
        holders = [*self.running, *self.suspended.values()]
        held = sum(r.own_blocks for r in holders)
        refs: dict[int, int] = {}
        for r in holders:
            for key in r.shared_hashes:
                refs[key] = refs.get(key, 0) + 1
        self.kv.check(held, refs)
