"""The engine core's fast path: an exact fast-forward of decoding, for the simulator.

Functions over an `EngineCoreBase` (declared here; `EngineCore` in sim/engine_core.py
derives from it, and its methods `schedule_fast`, `plan_decode_run`, `complete_run` and
`sync` call them): the lazy decoding cohort, the fast-path step, and the `DecodeRun` that
applies k decode steps at once.

When a just-scheduled batch decodes (or finishes the prompts of) the same sequences that
later steps will decode, and nothing can change it for a while, `plan_decode_run(core,
batch, start_s)` returns a `DecodeRun` of k steps whose durations are an arithmetic series
(the engine model's pure-decode step time is linear in context tokens), and
`complete_run(core, run, end_s)` applies all k steps at once, leaving exactly the state k
`complete`/`schedule` rounds would have left. The run can be cut short
(`DecodeRun.truncate`) when a new request arrives, and reports the load an observer would
see at any instant inside it (`kv_blocks_used_at`, `tokens_in_flight_at`).

The simulator's path: `schedule_fast`, `plan_decode_run`, `complete_run` (and
`complete` of a `schedule_fast` batch). Running requests that are decoding form a
cohort whose progress is not written into each request every step: a member's
generated tokens are `_gen_base + core._tick`, where `core._tick` counts fast-path steps
(every member decodes one token in every one of them). What a step needs from the
cohort comes from aggregates kept as members join and leave: how many there are, the
sum of their computed tokens, how many sit at each position inside a KV block (so how
many need a new block at the next step), and a heap of the steps at which they finish.
So a step, a run and a run cut short cost O(requests that join, leave or prefill),
not O(running). `sync()` writes the progress into the requests; `schedule()`,
`complete()` of a `schedule()` batch and preemption by KV pressure leave the fast
path (writing everything back), and the next `schedule_fast` rejoins it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from dataclasses import dataclass, field

from scheduler.engine_model import EngineModel
from sim.engine_types import Batch, EngineConfig, EngineRequest, RequestStatus, StepOutput
from sim.kv_cache import KVBlockManager


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
DECODE_LINES: weakref.WeakKeyDictionary[object, dict[int, tuple[float, float] | tuple[()]]] = (
    weakref.WeakKeyDictionary()
)


class EngineCoreBase:
    """What the fast path reads and writes of an engine core: `EngineCore`'s state, the
    helpers both paths share, and the step-path methods the fast path falls back to.

    `EngineCore` (sim/engine_core.py) derives from it and sets every attribute in its
    `__init__`. Declared here so that the functions below are typed (and compiled by mypyc
    to direct attribute reads) against the core without importing the module that calls
    them."""

    model: EngineModel
    config: EngineConfig
    kv: KVBlockManager
    max_model_len: int
    running: list[EngineRequest]
    requests: dict[str, EngineRequest]
    iterations_total: int
    _waiting: list[tuple[tuple[float, ...], EngineRequest]]  # heap
    _decode_lines: dict[int, tuple[float, float] | tuple[()]]
    _in_step: bool
    _tick: int
    _last_step_end_s: float
    _fast: bool
    _prefilling: list[EngineRequest]
    _finish_heap: list[tuple[int, int, EngineRequest]]
    _residue_counts: list[int]
    _cohort_base_sum: int
    _cohort_size: int
    _cohort_last_pos: int

    def _reset_cohort(self) -> None:
        """No cohort: the step path's state (every request's progress in its fields)."""
        self._fast = False  # the cohort is formed (every running request is in it or in _prefilling)
        self._prefilling = []  # running, not in the cohort (running order)
        self._finish_heap = []  # (finish tick, run pos, req)
        self._residue_counts = [0] * self.config.block_size  # members by (computed - tick) % bs
        self._cohort_base_sum = 0  # sum of members' computed - tick
        self._cohort_size = 0
        self._cohort_last_pos = -1  # latest admission position among members (an upper bound)

    def _shared_blocks(self, req: EngineRequest) -> int:
        return self.kv.shared_blocks(req.shared_hashes)

    def _held_blocks(self, req: EngineRequest) -> int:
        """KV blocks `req` holds: its own and the cached prefix blocks it references."""
        return req.own_blocks + (self.kv.shared_blocks(req.shared_hashes) if req.shared_hashes else 0)

    def _release(self, req: EngineRequest) -> None:
        self.kv.release(req.own_blocks, req.shared_hashes)
        req.own_blocks = 0

    # The step path (EngineCore's).
    def schedule(self) -> Batch:
        raise NotImplementedError

    def _admit(
        self, scheduled: list[tuple[EngineRequest, int]], budget: int, preempted: list[EngineRequest]
    ) -> list[tuple[EngineRequest, int]]:
        raise NotImplementedError

    def _apply_chunk(
        self, req: EngineRequest, new: int, end_s: float, tokens: list[EngineRequest], first: list[EngineRequest]
    ) -> bool:
        raise NotImplementedError


def decode_line(model: EngineModel, n: int, max_model_len: int) -> tuple[float, float] | tuple[()]:
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


def cohort_tokens(core: EngineCoreBase) -> int:
    """Tokens of the cohort's members (prompt + generated = computed + 1 each)."""
    return core._cohort_base_sum + core._cohort_size * (core._tick + 1)


def join(core: EngineCoreBase, req: EngineRequest, tick: int) -> None:
    """`req` decodes from the step after `tick` on: it holds ceil(computed / bs) blocks
    and computed == prompt + generated - 1."""
    req._in_cohort = True
    gen_base = req.generated_tokens - tick
    req._gen_base = gen_base
    base = req.prompt_tokens + gen_base - 1  # computed tokens - tick, constant while a member
    core._residue_counts[base % core.config.block_size] += 1
    core._cohort_base_sum += base
    core._cohort_size += 1
    if req._run_pos > core._cohort_last_pos:
        core._cohort_last_pos = req._run_pos
    heapq.heappush(core._finish_heap, (req.output_tokens - gen_base, req._run_pos, req))


def write_progress(core: EngineCoreBase, req: EngineRequest) -> None:
    """Write a cohort member's progress (tokens, KV blocks, last token time) into it."""
    generated = req._gen_base + core._tick
    if generated != req.generated_tokens:
        req.generated_tokens = generated
        req.last_token_s = core._last_step_end_s
    computed = req.prompt_tokens + generated - 1
    req.computed_tokens = computed
    held_tokens = computed + 1 if core._in_step else computed  # a scheduled step's block is held
    shared = core._shared_blocks(req) if req.shared_hashes else 0
    req.own_blocks = -(-held_tokens // core.config.block_size) - shared


def leave_cohort(core: EngineCoreBase, req: EngineRequest) -> None:
    """Take one member out of the cohort (finish, abort, preemption); its progress is written."""
    write_progress(core, req)
    base = req.prompt_tokens + req._gen_base - 1
    core._residue_counts[base % core.config.block_size] -= 1
    core._cohort_base_sum -= base
    core._cohort_size -= 1
    req._in_cohort = False  # its heap entry is now stale (skipped when it comes up)


def sync(core: EngineCoreBase) -> None:
    """Write the cohort's progress into its requests (for readers of request fields)."""
    if core._fast:
        for req in core.running:
            if req._in_cohort:
                write_progress(core, req)


def enter_fast(core: EngineCoreBase) -> bool:
    """Form the cohort from the running requests; False (and no change) if a decoding
    request holds more KV blocks than its tokens need (then the exact step path runs)."""
    bs = core.config.block_size
    members: list[EngineRequest] = []
    prefilling: list[EngineRequest] = []
    for req in core.running:
        generated = req.generated_tokens
        computed = req.computed_tokens
        if generated > 0 and computed == req.prompt_tokens + generated - 1:
            held = core._held_blocks(req)
            if held != -(-computed // bs):
                return False
            members.append(req)
        else:
            prefilling.append(req)
    core._fast = True
    core._prefilling = prefilling
    for req in members:
        join(core, req, core._tick)
    return True


def leave_fast(core: EngineCoreBase) -> None:
    """Write every member's progress back and dissolve the cohort."""
    if not core._fast:
        return
    if core._in_step:
        raise RuntimeError("a schedule_fast batch is in flight: complete it before stepping")
    for req in core.running:
        if req._in_cohort:
            write_progress(core, req)
            req._in_cohort = False
    core._reset_cohort()


def schedule_fast(core: EngineCoreBase) -> Batch:
    """The batch `schedule()` would return, with the same state changes, at a cost that
    does not grow with the running decoders (see the module docstring).

    The batch's `scheduled` lists only the requests outside the cohort (prefilling
    ones, and those admitted now); `cohort_decodes` members decode one token each.
    Where the exact outcome depends on a per-request walk (preemption because KV ran
    out, a token budget smaller than the decoders), this leaves the fast path and
    returns `schedule()`'s batch. Complete the batch with `complete` (or plan a run on
    it with `plan_decode_run`) before the next `schedule_fast`.
    """
    if not core._fast and not enter_fast(core):
        return core.schedule()
    if core._in_step:
        raise RuntimeError("schedule_fast: the previous batch has not been completed")
    bs = core.config.block_size
    max_budget = core.config.max_num_batched_tokens
    tick = core._tick
    members = core._cohort_size
    prefilling = core._prefilling
    if members > max_budget:
        leave_fast(core)
        return core.schedule()
    budget = max_budget - members
    if (
        prefilling
        and prefilling[0]._run_pos < core._cohort_last_pos
        and budget < sum(r.prompt_tokens + r.generated_tokens - r.computed_tokens for r in prefilling)
    ):
        # Some prompt gets a partial chunk and a decoder comes after it in the running
        # order (not the usual case: prompts are admitted behind the decoders), so who
        # gets the budget depends on a walk in that order: the step path's.
        leave_fast(core)
        return core.schedule()
    need_total = core._residue_counts[-tick % bs] if members else 0
    scheduled: list[tuple[EngineRequest, int]] = []
    growing: list[tuple[EngineRequest, int]] = []
    for req in prefilling:
        if budget <= 0:
            break
        computed = req.computed_tokens
        new = req.prompt_tokens + req.generated_tokens - computed
        if new > budget:
            new = budget
        held = core._held_blocks(req)
        need = -(-(computed + new) // bs) - held
        if need > 0:
            need_total += need
            growing.append((req, need))
        scheduled.append((req, new))
        budget -= new
    kv = core.kv
    if need_total > kv.free_blocks:
        if need_total > kv.free_blocks + kv.evictable_blocks:
            leave_fast(core)  # someone is preempted: the step path decides who
            return core.schedule()
        # The step path evicts cached prefixes (LRU) as each request grows; evicting
        # until the whole growth fits evicts the same entries.
        while kv.free_blocks < need_total:
            kv.evict_one()
    kv.free_blocks -= need_total
    for req, need in growing:
        req.own_blocks += need
    core._in_step = True
    preempted: list[EngineRequest] = []
    if core._waiting and budget > 0 and len(core.running) < core.config.max_num_seqs:
        scheduled = core._admit(scheduled, budget, preempted)
    members = core._cohort_size  # fewer if admission preempted a member (admit_preemption)
    prefill_tokens = 0
    decode_seqs = members
    context = cohort_tokens(core)  # each member decodes with computed + 1 tokens of context
    pairs = 0.0
    for req, new in scheduled:
        if new == 1 and req.generated_tokens > 0:
            decode_seqs += 1
            context += req.computed_tokens + 1
        else:
            prefill_tokens += new
            pairs += new * (req.computed_tokens + (new + 1) / 2.0)
    duration = core.model.iteration_time_s(prefill_tokens, decode_seqs, context, pairs)
    if not scheduled and not members:
        core._in_step = False  # nothing to run (or complete)
    return Batch(scheduled, prefill_tokens, decode_seqs, context, pairs, duration, preempted, members, tick)


def plan_decode_run(
    core: EngineCoreBase, batch: Batch, start_s: float, max_steps: int | None = None
) -> DecodeRun | None:
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
    n = len(core.running)
    explicit = batch.scheduled
    if n == 0 or len(explicit) + core._cohort_size != n:
        return None  # a prompt got no budget this step
    if batch.prefill_tokens > 0 and core._waiting and n < core.config.max_num_seqs:
        return None
    steps = max_steps if max_steps is not None else 1 << 62
    heap = core._finish_heap
    while heap:  # the first member to finish (stale entries of members gone are dropped)
        finish_tick, pos, req = heap[0]
        if req._in_cohort and req._run_pos == pos:
            if finish_tick - core._tick < steps:
                steps = finish_tick - core._tick
            break
        heapq.heappop(heap)
    bs = core.config.block_size
    tick = core._tick
    members = core._cohort_size
    # After step 0 a member with residue r has computed r + tick + 1 tokens (mod bs), so
    # its slack is -(r + tick + 1) % bs: slack s holds residue (k - s) % bs with
    # k = -(tick + 1) % bs, i.e. the residue counts from k down, wrapping around.
    k = -(tick + 1) % bs
    residues = core._residue_counts
    by_slack = residues[k::-1] + residues[:k:-1]
    # Tokens of the cohort (computed + 1 each), and the context of step 1 (one more each).
    tokens = cohort_tokens(core)
    context_after_first = tokens + members
    caching = core.config.enable_prefix_caching
    for req, new in explicit:
        generated = req.generated_tokens
        computed = req.computed_tokens
        # Only a prompt's last chunk (it emits a token at the end of step 0), and no
        # prefix blocks to promote into the cache when it completes.
        if computed + new != req.prompt_tokens + generated or (caching and req.prefix_hashes):
            return None
        if req.output_tokens - generated < steps:
            steps = req.output_tokens - generated
        held = core._held_blocks(req)
        slack = held * bs - computed - new
        if slack >= bs:
            return None  # holds more blocks than it needs: not a cohort member later
        by_slack[slack] += 1
        tokens += req.prompt_tokens + generated
        context_after_first += computed + new + 1
    if steps <= 1:
        return None
    line = core._decode_lines.get(n)
    if line is None:
        line = core._decode_lines[n] = decode_line(core.model, n, core.max_model_len)
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
        kv_blocks_used_start=core.kv.used_blocks,
        tokens_in_flight_start=tokens,
        _slack_at_most=list(itertools.accumulate(by_slack)),
    )
    free = core.kv.free_blocks
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


def complete_run(core: EngineCoreBase, run: DecodeRun, end_s: float) -> StepOutput:
    """Apply all `run.steps` steps of a run ending at `end_s`: the state, counters and
    token times are those of as many `complete`/`schedule` rounds. `tokens` and
    `first_tokens` list the requests of step 0 outside the cohort that emitted a token
    (their first, at the end of step 0); `finished`, everyone who finished."""
    steps = run.steps
    first_end_s = end_s if steps == 1 else run.start_s + run.first_step_s
    return complete_fast(core, run.batch, steps, end_s, first_end_s, run.later_blocks)


def complete_fast(
    core: EngineCoreBase, batch: Batch, steps: int, end_s: float, first_end_s: float, later_blocks: int
) -> StepOutput:
    if batch.empty:
        core.iterations_total += 1
        return StepOutput([], [], [])
    if not core._in_step or batch.tick != core._tick:
        raise RuntimeError("this batch is not the one in flight (complete each batch once, in order)")
    core._in_step = False
    core.iterations_total += steps
    tick1 = core._tick + 1
    core._tick = tick1
    core._last_step_end_s = first_end_s
    tokens: list[EngineRequest] = []
    first: list[EngineRequest] = []
    finished: list[EngineRequest] = []
    running_status = RequestStatus.RUNNING
    irregular = False
    if batch.scheduled:
        bs = core.config.block_size
        for req, new in batch.scheduled:
            if req.status is not running_status:
                continue  # aborted while the step ran
            if core._apply_chunk(req, new, first_end_s, tokens, first):
                if req.generated_tokens >= req.output_tokens:
                    finished.append(req)
                    continue
            elif req.generated_tokens == 0 or req.computed_tokens != req.num_tokens - 1:
                continue  # a prefill chunk
            computed = req.computed_tokens
            # Decoding from the next step on.
            held = core._held_blocks(req)
            if held != -(-computed // bs):
                irregular = True
                continue
            join(core, req, tick1)
        core._prefilling = [r for r in core._prefilling if r.status is running_status and not r._in_cohort
                            and r not in finished]
    if steps > 1:
        core._tick += steps - 1
        core._last_step_end_s = end_s
        core.kv.free_blocks -= later_blocks
    heap = core._finish_heap
    tick = core._tick
    explicit_finished = len(finished)
    while heap and heap[0][0] <= tick:
        _, pos, req = heapq.heappop(heap)
        if req._in_cohort and req._run_pos == pos:
            leave_cohort(core, req)
            finished.append(req)
    if explicit_finished and len(finished) > explicit_finished:
        finished.sort(key=lambda r: r._run_pos)  # running order, as stepping reports them
    for req in finished:
        req.last_token_s = end_s
        req.finish_s = end_s
        req.status = RequestStatus.FINISHED
        core.running.remove(req)
        core._release(req)
        del core.requests[req.request_id]
    if irregular:
        leave_fast(core)
    return StepOutput(tokens, first, finished)
