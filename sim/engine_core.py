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

Fast-forward (for the simulator): `schedule_fast`, `plan_decode_run(batch, start_s)` and
`complete_run(run, end_s)` apply k decode steps at once, leaving exactly the state k
`complete`/`schedule` rounds would have left; the code is sim/engine_fast.py's. The
engine's data (EngineConfig, EngineRequest, Batch, StepOutput) is sim/engine_types.py's,
re-exported here.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

from scheduler.engine_model import EngineModel
from scheduler.priority_headroom import running_by_priority
from scheduler.types import RunningByPriority
from sim import engine_fast as fast
from sim.engine_fast import DecodeRun, EngineCoreBase
from sim.engine_types import (
    Batch,
    EngineConfig,
    EngineConfigError,
    EngineRequest,
    RequestStatus,
    StepOutput,
)
from sim.kv_cache import CacheEntry, KVBlockManager

# Re-exported: callers import the engine's types from here.
__all__ = [
    "Batch",
    "DecodeRun",
    "EngineConfig",
    "EngineConfigError",
    "EngineCore",
    "EngineRequest",
    "RequestStatus",
    "StepOutput",
]


class EngineCore(EngineCoreBase):
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
        if self.max_model_len > model.model.max_context_tokens:  # vLLM refuses it too
            raise EngineConfigError(
                f"max_model_len {self.max_model_len} is longer than {model.model.name}'s context length "
                f"({model.model.max_context_tokens} tokens); expected at most that"
            )
        # The KV block pool and prefix cache (sim/kv_cache.py); this class decides who
        # holds how many blocks, the manager counts them.
        self.kv = KVBlockManager(capacity, self.config.block_size, self.config.enable_prefix_caching)
        self._waiting = []  # heap
        self.running = []
        self._seq = itertools.count()
        self.requests = {}
        self.suspended: dict[str, EngineRequest] = {}  # by request id (also in `requests`)
        # Counters, exported by drivers as metrics.
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hits_tokens = 0
        self.preemptions_total = 0
        self.iterations_total = 0
        # plan_decode_run: (t0, slope) of a pure decode step by batch size (the model's
        # `decode_step_linear_s`, checked once per size by `fast.decode_line`).
        self._decode_lines = fast.DECODE_LINES.setdefault(model, {})
        self._run_counter = itertools.count()
        self._by_priority = self.config.scheduling_policy == "priority"
        self._admit_preemption = self._by_priority and self.config.admit_preemption
        # The fast path's decoding cohort (see "fast path" below).
        self._in_step = False  # a schedule_fast batch is in flight
        self._tick = 0  # fast-path steps completed
        self._last_step_end_s = 0.0
        self._reset_cohort()

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
                fast.leave_cohort(self, req)
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
        fast.leave_fast(self)
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
        fast.leave_fast(self)
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
        fast.leave_fast(self)
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
    def running_by_priority(self) -> RunningByPriority:
        """The running requests counted per priority class (what drivers publish for the
        priority headroom of virtual usage)."""
        return running_by_priority(r.priority for r in self.running)

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
            return fast.cohort_tokens(self) + sum(r.num_tokens for r in self._prefilling)
        return sum(r.num_tokens for r in self.running)

    # ------------------------------------------------------------- KV blocks
    # Request-facing wrappers over the block manager (sim/kv_cache.py).
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _allocate(self, blocks: int) -> bool:
        return self.kv.allocate(blocks)

    def _evict_one(self) -> None:
        self.kv.evict_one()

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
            fast.leave_cohort(self, req)
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
        fast.leave_fast(self)
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
        allow: the first that does not fit stops admission, as in vLLM V1 (only running
        requests preempt, to grow). With `admit_preemption` (vLLM V0's priority scheduler)
        it preempts lower-priority running requests to fit instead.
        Appends to `scheduled` and `preempted`; returns `scheduled` without the victims."""
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            _, req = self._waiting[0]
            if req.computed_tokens == 0 and not req.shared_hashes:
                self._lookup_prefix(req)
            new = min(req.num_tokens - req.computed_tokens, budget)
            if not self._grow(req, new):
                if self._admit_preemption and self.running and self._victim().priority > req.priority:
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
            return fast.complete_fast(self, batch, 1, end_s, end_s, 0)
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
    # The simulator's path, in sim/engine_fast.py: a lazy decoding cohort whose progress
    # is written into its requests only on demand (`sync`), and exact decode runs.
    def sync(self) -> None:
        """Write the cohort's progress into its requests (for readers of request fields)."""
        fast.sync(self)

    def schedule_fast(self) -> Batch:
        """The batch `schedule()` would return, with the same state changes, at a cost that
        does not grow with the running decoders (see sim/engine_fast.py)."""
        return fast.schedule_fast(self)

    def plan_decode_run(self, batch: Batch, start_s: float, max_steps: int | None = None) -> DecodeRun | None:
        """The longest stretch of steps from `batch` (just returned by `schedule_fast`) that
        all decode the same sequences; None if it is one step (see sim/engine_fast.py)."""
        return fast.plan_decode_run(self, batch, start_s, max_steps)

    def complete_run(self, run: DecodeRun, end_s: float) -> StepOutput:
        """Apply all `run.steps` steps of a run ending at `end_s`, exactly as many
        `complete`/`schedule` rounds would."""
        return fast.complete_run(self, run, end_s)

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
