"""One engine core, two clocks: the continuous-batching iteration logic of a vLLM-like engine.

The core owns the waiting and running queues, KV-block accounting with a prefix cache,
admission, chunked prefill and preemption (by recomputation, as vLLM v1 does). It has no
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
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from scheduler.engine_model import EngineModel


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
    # Set by `schedule_fast` for `plan_decode_run`, valid only until the state changes:
    # (least output tokens left, slack tokens of each of the first len(slacks) scheduled
    # requests after their growth, sum of their prompt + generated tokens, sum of their
    # computed tokens), so that planning a run does not walk the batch again.
    plan_hint: tuple[int, list[int], int, int] | None = None


@dataclass(slots=True)
class StepOutput:
    """What one completed iteration produced."""

    tokens: list[EngineRequest]  # requests that emitted one new token (in batch order)
    first_tokens: list[EngineRequest]  # subset: emitted their first token
    finished: list[EngineRequest]


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
    requests: list[EngineRequest]  # the running requests, in batch order
    first_step_tokens: list[int]  # tokens each computes in step 0 (1 for a decode)
    slack_tokens: list[int]  # tokens each can add after step 0 before it needs a new KV block
    block_size: int
    kv_blocks_used_start: int  # while step 0 runs
    tokens_in_flight_start: int  # while step 0 runs
    _slack_groups: list[tuple[int, int]] = field(default_factory=list)  # (slack, how many)

    def elapsed_s(self, steps: int) -> float:
        """Time from the run's start to the end of its `steps`-th step."""
        if steps <= 0:
            return 0.0
        later = steps - 1
        return self.first_step_s + later * self.second_step_s + self.step_growth_s * (later * (later - 1) / 2.0)

    @property
    def end_s(self) -> float:
        return self.start_s + self.elapsed_s(self.steps)

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
        """KV blocks the sequences grew into during steps 1..`steps_started`."""
        if steps_started <= 0:
            return 0
        bs = self.block_size
        total = 0
        for slack, count in self._slack_groups:
            extra = steps_started - slack
            if extra > 0:
                total += count * -(-extra // bs)
        return total

    def kv_blocks_used_at(self, steps_done: int) -> int:
        """Blocks in use while step `steps_done` runs (its blocks are already allocated)."""
        in_progress = min(steps_done, self.steps - 1)
        return self.kv_blocks_used_start + self.blocks_allocated(in_progress)

    def tokens_in_flight_at(self, steps_done: int) -> int:
        return self.tokens_in_flight_start + len(self.requests) * min(steps_done, self.steps)

    def truncate(self, steps: int) -> None:
        """Stop the run after `steps` steps (something outside changed the next batch)."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"a run of {self.steps} steps cannot be cut to {steps}")
        self.steps = steps


@dataclass(slots=True)
class _CacheEntry:
    blocks: int
    refs: int = 0


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
        self.free_blocks = capacity
        self._cache: OrderedDict[int, _CacheEntry] = OrderedDict()  # LRU order, evictable if refs == 0
        self._evictable_blocks = 0
        self._waiting: list[tuple[tuple[float, ...], EngineRequest]] = []  # heap
        self.running: list[EngineRequest] = []
        self._seq = itertools.count()
        self.requests: dict[str, EngineRequest] = {}
        # Counters, exported by drivers as metrics.
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hits_tokens = 0
        self.preemptions_total = 0
        self.iterations_total = 0
        # plan_decode_run: (t0, slope) of a pure decode step by batch size (the model's
        # `decode_step_linear_s`, a pure function of it; each plan still checks it).
        self._decode_lines: dict[int, tuple[float, float]] = {}

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
        req._seq = next(self._seq)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        heapq.heappush(self._waiting, (self._wait_key(req), req))

    def abort(self, request_id: str) -> EngineRequest | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is RequestStatus.WAITING:
            self._waiting = [(k, r) for k, r in self._waiting if r is not req]
            heapq.heapify(self._waiting)
        req.status = RequestStatus.ABORTED
        return req

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
        return self.num_kv_blocks - self.free_blocks - self._evictable_blocks

    @property
    def tokens_in_flight(self) -> int:
        return sum(r.num_tokens for r in self.running)

    # ------------------------------------------------------------- KV blocks
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _shared_blocks(self, req: EngineRequest) -> int:
        return sum(self._cache[h].blocks for h in req.shared_hashes)

    def _allocate(self, blocks: int) -> bool:
        if blocks <= 0:
            return True
        if self.free_blocks + self._evictable_blocks < blocks:
            return False
        while self.free_blocks < blocks:
            self._evict_one()
        self.free_blocks -= blocks
        return True

    def _evict_one(self) -> None:
        for key, entry in self._cache.items():
            if entry.refs == 0:
                del self._cache[key]
                self._evictable_blocks -= entry.blocks
                self.free_blocks += entry.blocks
                return
        raise AssertionError("no evictable prefix-cache block although accounting says there is")

    def _release(self, req: EngineRequest) -> None:
        self.free_blocks += req.own_blocks
        req.own_blocks = 0
        for key in req.shared_hashes:
            entry = self._cache[key]
            entry.refs -= 1
            if entry.refs == 0:
                self._evictable_blocks += entry.blocks
        req.shared_hashes.clear()

    def _hash_blocks(self, req: EngineRequest) -> int:
        return req.prefix_block_tokens // self.config.block_size

    def _lookup_prefix(self, req: EngineRequest) -> None:
        """On admission: reference the cached leading prefix blocks, skip computing them."""
        if not self.config.enable_prefix_caching or not req.prefix_hashes:
            return
        usable = min(len(req.prefix_hashes), req.prompt_tokens // req.prefix_block_tokens)
        hits = 0
        for key in req.prefix_hashes[:usable]:
            entry = self._cache.get(key)
            if entry is None:
                break
            hits += 1
        # Always compute at least the prompt's last token, as vLLM does.
        while hits and hits * req.prefix_block_tokens >= req.prompt_tokens:
            hits -= 1
        for key in req.prefix_hashes[:hits]:
            entry = self._cache[key]
            if entry.refs == 0:
                self._evictable_blocks -= entry.blocks
            entry.refs += 1
            self._cache.move_to_end(key)
            req.shared_hashes.append(key)
        req.computed_tokens = hits * req.prefix_block_tokens
        req.cached_prompt_tokens = req.computed_tokens

    def _promote_prefix(self, req: EngineRequest) -> None:
        """Move fully computed prompt blocks with a hash from private to shared (cached)."""
        if not self.config.enable_prefix_caching or not req.prefix_hashes:
            return
        done = min(req.computed_tokens, req.prompt_tokens) // req.prefix_block_tokens
        done = min(done, len(req.prefix_hashes))
        per_hash = self._hash_blocks(req)
        while len(req.shared_hashes) < done:
            key = req.prefix_hashes[len(req.shared_hashes)]
            entry = self._cache.get(key)
            if entry is None:
                entry = _CacheEntry(blocks=per_hash)
                self._cache[key] = entry
            else:
                # Someone else computed the same block meanwhile: keep theirs, free ours.
                self.free_blocks += per_hash
                if entry.refs == 0:
                    self._evictable_blocks -= entry.blocks
            self._cache.move_to_end(key)
            entry.refs += 1
            req.own_blocks -= per_hash
            req.shared_hashes.append(key)

    def _grow(self, req: EngineRequest, new_tokens: int) -> bool:
        """Make sure `req` holds blocks for computed + new tokens."""
        needed = self._blocks_for(req.computed_tokens + new_tokens) - req.own_blocks - self._shared_blocks(req)
        if needed <= 0:
            return True
        if not self._allocate(needed):
            return False
        req.own_blocks += needed
        return True

    def _preempt(self, req: EngineRequest) -> None:
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
            self.running.append(req)
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

    def complete(self, batch: Batch, end_s: float) -> StepOutput:
        """Apply an iteration that ended at `end_s`: advance progress, emit tokens, finish."""
        self.iterations_total += 1
        tokens: list[EngineRequest] = []
        first: list[EngineRequest] = []
        finished: list[EngineRequest] = []
        for req, new in batch.scheduled:
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the iteration ran
            req.computed_tokens += new
            self._promote_prefix(req)
            if req.computed_tokens < req.num_tokens:
                continue  # a prefill chunk; no token yet
            req.generated_tokens += 1
            req.last_token_s = end_s
            tokens.append(req)
            if req.first_token_s is None:
                req.first_token_s = end_s
                first.append(req)
            if req.generated_tokens >= req.output_tokens:
                req.finish_s = end_s
                req.status = RequestStatus.FINISHED
                self.running.remove(req)
                self._release(req)
                del self.requests[req.request_id]
                finished.append(req)
        return StepOutput(tokens, first, finished)

    # ---------------------------------------------------------- fast-forward
    def schedule_fast(self) -> Batch:
        """The batch `schedule()` would return, with the same state changes, in one pass.

        When the running requests' KV growth fits in the free blocks (no eviction, no
        preemption: the common case), their tokens, blocks and the batch shape are worked
        out in one loop instead of a `_grow` call and a `_shape` pass per request; otherwise
        this is `schedule()` itself. Waiting requests are admitted exactly as there. The
        simulator calls it on every iteration; tests compare it with `schedule()`.
        """
        bs = self.config.block_size
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[EngineRequest, int]] = []
        growing: list[tuple[EngineRequest, int]] = []
        need_total = 0
        prefill_tokens = 0
        decode_seqs = 0
        context = 0
        pairs = 0.0
        running_status = RequestStatus.RUNNING
        slacks: list[int] = []  # for plan_decode_run (see Batch.plan_hint)
        min_left = 1 << 62
        tokens_sum = 0
        computed_sum = 0
        for req in self.running:
            if budget <= 0:
                break
            if req.status is not running_status:
                continue
            computed = req.computed_tokens
            generated = req.generated_tokens
            prompt = req.prompt_tokens
            new = prompt + generated - computed
            if new > budget:
                new = budget
            held = req.own_blocks
            if req.shared_hashes:
                held += self._shared_blocks(req)
            need = -(-(computed + new) // bs) - held
            if need > 0:
                need_total += need
                growing.append((req, need))
                held += need
            slacks.append(held * bs - computed - new)
            left = req.output_tokens - generated
            if left < min_left:
                min_left = left
            tokens_sum += prompt + generated
            computed_sum += computed
            scheduled.append((req, new))
            budget -= new
            if new == 1 and generated > 0:
                decode_seqs += 1
                context += computed + 1
            else:
                prefill_tokens += new
                pairs += new * (computed + (new + 1) / 2.0)
        if need_total > self.free_blocks:
            return self.schedule()
        if need_total:
            self.free_blocks -= need_total
            for req, need in growing:
                req.own_blocks += need
        hint = (min_left, slacks, tokens_sum, computed_sum)
        if not self._waiting or budget <= 0 or len(self.running) >= self.config.max_num_seqs:
            duration = self.model.iteration_time_s(prefill_tokens, decode_seqs, context, pairs)
            return Batch(scheduled, prefill_tokens, decode_seqs, context, pairs, duration, [], hint)
        preempted: list[EngineRequest] = []
        admitted_from = len(scheduled)
        scheduled = self._admit(scheduled, budget, preempted)
        if preempted:
            return self._shape(scheduled, preempted)
        for req, new in scheduled[admitted_from:]:
            if new == 1 and req.generated_tokens > 0:
                decode_seqs += 1
                context += req.computed_tokens + 1
            else:
                prefill_tokens += new
                pairs += new * (req.computed_tokens + (new + 1) / 2.0)
        duration = self.model.iteration_time_s(prefill_tokens, decode_seqs, context, pairs)
        return Batch(scheduled, prefill_tokens, decode_seqs, context, pairs, duration, preempted, hint)

    def _plan_walk(
        self, batch: Batch, steps: int, caching: bool
    ) -> tuple[list[int], list[int], dict[int, int], int, int, int | None]:
        """`plan_decode_run`'s walk over a batch without `plan_hint` (from `schedule`)."""
        bs = self.config.block_size
        slacks: list[int] = []
        first_tokens: list[int] = []
        groups: dict[int, int] = {}
        tokens = 0
        context_after_first = 0
        for req, new in batch.scheduled:
            generated = req.generated_tokens
            left = req.output_tokens - generated
            if left < steps:
                if left <= 1:
                    return [], [], {}, 0, 0, None
                steps = left
            computed = req.computed_tokens
            # A prefill chunk: only the last one of a prompt, and no prefix blocks to
            # promote into the cache when it completes.
            if not (new == 1 and generated > 0) and (
                computed + new != req.prompt_tokens + generated or (caching and req.prefix_hashes)
            ):
                return [], [], {}, 0, 0, None
            held = req.own_blocks
            if req.shared_hashes:
                held += self._shared_blocks(req)
            slack = held * bs - computed - new
            slacks.append(slack)
            first_tokens.append(new)
            groups[slack] = groups.get(slack, 0) + 1
            tokens += req.prompt_tokens + generated
            context_after_first += computed + new + 1
        return slacks, first_tokens, groups, tokens, context_after_first, steps

    def plan_decode_run(self, batch: Batch, start_s: float, max_steps: int | None = None) -> DecodeRun | None:
        """If `batch` (just returned by `schedule`, starting at `start_s`) begins a stretch of
        steps that all decode the same sequences, describe the longest such stretch; None if
        it is one step.

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
        running = self.running
        n = len(running)
        if n == 0 or batch.preempted or len(batch.scheduled) != n:
            return None
        has_prefill = batch.prefill_tokens > 0
        caching = self.config.enable_prefix_caching
        if has_prefill and self._waiting and n < self.config.max_num_seqs:
            return None
        steps = max_steps if max_steps is not None else 1 << 62
        bs = self.config.block_size
        hint = batch.plan_hint
        if hint is not None and len(hint[1]) <= n:
            # schedule_fast walked the running requests already: only the requests it
            # admitted after them are looked at here.
            min_left, head_slacks, tokens, computed_sum = hint
            scheduled = batch.scheduled
            head = len(head_slacks)
            slacks = list(head_slacks)
            first_tokens = [new for _, new in scheduled]
            for req, new in scheduled[head:]:
                left = req.output_tokens - req.generated_tokens
                if left < min_left:
                    min_left = left
                held = req.own_blocks
                if req.shared_hashes:
                    held += self._shared_blocks(req)
                slacks.append(held * bs - req.computed_tokens - new)
                tokens += req.prompt_tokens + req.generated_tokens
                computed_sum += req.computed_tokens
            if min_left < steps:
                if min_left <= 1:
                    return None
                steps = min_left
            if has_prefill or batch.decode_seqs != n:
                for req, new in scheduled:
                    generated = req.generated_tokens
                    if not (new == 1 and generated > 0) and (
                        req.computed_tokens + new != req.prompt_tokens + generated
                        or (caching and req.prefix_hashes)
                    ):
                        return None
            groups: dict[int, int] = {}
            for slack in slacks:
                groups[slack] = groups.get(slack, 0) + 1
            context_after_first = computed_sum + sum(first_tokens) + n
        else:
            slacks, first_tokens, groups, tokens, context_after_first, steps_or_none = self._plan_walk(
                batch, steps, caching
            )
            if steps_or_none is None:
                return None
            steps = steps_or_none
        if steps <= 1:
            return None
        line = self._decode_lines.get(n)
        if line is None:
            model_step = getattr(self.model, "decode_step_linear_s", None)
            if model_step is None:
                return None
            line = self._decode_lines[n] = model_step(n)
        t0, slope = line
        first = batch.duration_s
        second = t0 + slope * context_after_first
        # The engine model promises a pure decode step is t0 + slope * context; if a model
        # breaks that promise, fall back to stepping rather than drift.
        check = self.model.iteration_time_s(0, n, context_after_first, 0.0)
        if abs(second - check) > 1e-9 * max(1.0, check):
            return None
        run = DecodeRun(
            batch=batch,
            start_s=start_s,
            steps=steps,
            first_step_s=first,
            second_step_s=second,
            step_growth_s=slope * n,
            requests=list(running),
            first_step_tokens=first_tokens,
            slack_tokens=slacks,
            block_size=bs,
            kv_blocks_used_start=self.kv_blocks_used,
            tokens_in_flight_start=tokens,
            _slack_groups=sorted(groups.items()),
        )
        free = self.free_blocks
        # Each sequence grows by at most ceil((steps - 1 - least slack) / bs) blocks: when
        # that fits, the exact count need not be worked out here.
        most = n * -(-(steps - 1 - min(slacks)) // bs)
        if most > free and run.blocks_allocated(steps - 1) > free:
            lo, hi = 1, steps  # lo fits (step 0 grows nothing more), hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if run.blocks_allocated(mid - 1) <= free:
                    lo = mid
                else:
                    hi = mid
            if lo <= 1:
                return None
            run.steps = lo
        return run

    def complete_run(self, run: DecodeRun, end_s: float) -> StepOutput:
        """Apply all `run.steps` steps of a run ending at `end_s`: the state, counters and
        token times are those of as many `complete`/`schedule` rounds. `tokens` lists the
        requests that emitted tokens (`run.steps` each); `first_tokens` those whose first
        token came at the end of step 0."""
        steps = run.steps
        bs = run.block_size
        allocated = 0
        tokens: list[EngineRequest] = []
        first: list[EngineRequest] = []
        finished: list[EngineRequest] = []
        first_end_s: float | None = None
        later = steps - 1
        running_status = RequestStatus.RUNNING
        for req, slack, first_new in zip(run.requests, run.slack_tokens, run.first_step_tokens, strict=True):
            if req.status is not running_status:
                continue  # aborted during the run
            if slack < later:
                grow = -(-(later - slack) // bs)
                req.own_blocks += grow
                allocated += grow
            req.computed_tokens += first_new + later
            generated = req.generated_tokens + steps
            req.generated_tokens = generated
            req.last_token_s = end_s
            tokens.append(req)
            if req.first_token_s is None:
                if first_end_s is None:
                    first_end_s = end_s if steps == 1 else run.step_end_s(1)
                req.first_token_s = first_end_s
                first.append(req)
            if generated >= req.output_tokens:
                finished.append(req)
        self.free_blocks -= allocated
        self.iterations_total += steps
        for req in finished:
            req.finish_s = end_s
            req.status = RequestStatus.FINISHED
            self.running.remove(req)
            self._release(req)
            del self.requests[req.request_id]
        return StepOutput(tokens, first, finished)

    def check_invariants(self) -> None:
        """Raise AssertionError if the block accounting is inconsistent (for tests)."""
        held = sum(r.own_blocks for r in self.running)
        cached = sum(e.blocks for e in self._cache.values())
        evictable = sum(e.blocks for e in self._cache.values() if e.refs == 0)
        assert self.free_blocks >= 0, self.free_blocks
        assert evictable == self._evictable_blocks, (evictable, self._evictable_blocks)
        assert held + cached + self.free_blocks == self.num_kv_blocks, (
            held, cached, self.free_blocks, self.num_kv_blocks,
        )
        refs: dict[int, int] = {}
        for r in self.running:
            for key in r.shared_hashes:
                refs[key] = refs.get(key, 0) + 1
        for key, entry in self._cache.items():
            assert entry.refs == refs.get(key, 0), (key, entry.refs, refs.get(key, 0))
