"""The autoscaling control loop, as pure decisions: pool targets from observed load, and the
instance changes that reach them.

Every `interval_s` the driver (router control plane, or the simulator on simulated time)
measures each pool's load over the last `window_s` in instance-equivalents (requests of
each length bucket routed to the pool, each counting 1 / the capacity of one instance for
that bucket: `pool_loads`) and calls `decide_targets`:

- scale up at once when the load needs more instances than the pool has at `headroom`;
- scale down only when it would still fit at the larger `scale_down_headroom` (a
  hysteresis band: a load between the two moves nothing) and the pool has not changed for
  `dwell_s` (no flapping);
- a pool that received nothing for `idle_s` goes to its minimum (zero allowed), still
  after its dwell;
- each change moves at most `max_step` instances (rate-limited).

`reconcile` turns a target into instance actions: a scale-up first takes back instances
that are still draining, then starts new ones (ready after the cold start); a scale-down
drains the emptiest ready instances; a draining instance is removed only once nothing is
in flight on it, so a scale-down never aborts a request.

Every `resolve_interval_s` the driver also re-solves the plan from the window's rates
(`PoolSetSwitch.resolve`: the loop's floors and band in the solve, below) and asks
`keep_or_switch` which plan to run (hysteresis on the plan's pool set, `switch_margin`):

- a candidate on the same pools as the current plan is run (no pool starts or empties
  because of it) when it costs less than `1 - switch_margin` times what the current
  plan's own shares need at this load (`carried_usd_per_hour`), or when those shares do
  not carry it; otherwise the current plan stays (`steady`). New shares move load between
  running pools: the pool that gains it scales up at once, the one that loses it scales
  down only after its dwell and past the band, so for a while both are sized for it;
- otherwise the same problem is solved on the current plan's pools only (what staying on
  them costs at this load, on the same footing as the candidate). The candidate replaces
  the current pools only when it costs less than `1 - switch_margin` times that, or at
  once when that solve fails, i.e. the current pools cannot carry this load at all (a
  bucket with traffic none of them can serve, a pool it would need past its maximum, a GPU
  type past its availability): coverage beats cost;
- otherwise the plan on the current pools is run: the pool set stays, the shares are
  re-balanced on it (so a bucket that had no traffic when the current plan was solved is
  routed to the current pools, not taken for a reason to swap), and the target decision
  above sizes its pools to the load.

An added pool pays the margin like a swap: it starts a GPU type the fleet does not run,
cold, while traffic moves off pools that are up. A pure drop does not: the best plan on
the current pools is then the candidate itself (it uses a subset of them), and it is
adopted. Why that is right: a drop starts nothing new (its traffic moves onto pools that
are running, which grow by the target decision's rules), the pool it empties drains first
(no request is aborted), and keeping a pool that the best plan on the running pools leaves
out pays for it with no transition saved, only deferred. A drop cannot flap at a near-tie
either: the way back is an add, which pays the margin. The same holds when the candidate
is a swap refused by the margin and the best plan on the current pools leaves one of them
out (`dropped`).

A margin damps near-ties, not the integer steps of a small fleet whose load crosses the
capacity of a mixed set of pools (1x A10G + 1x L40S against 2x L40S on the ServeGen day:
24% apart, each way in turn). So a pool set also has a dwell, `switch_dwell_s`: within it
after a change of the pool set, a candidate on other pools is `held` (the current plan
runs on, shares and routing table unchanged) as long as the current plan's own shares
carry the load (`carries`); when they do not, the best plan that keeps every current pool
(each at one instance at least) runs (`kept`), and only when no such plan exists the best
plan on the current pools (which may drop one) or, when they cannot carry the load at
all, the candidate. On the ServeGen day (before the floors) the current shares stopped
carrying the load 28 times within the dwell, 27 of them for one request in a bucket that
had had no traffic at the last solve (1 request in the 120 s window, 0.008 req/s), once for
a pool past its maximum; the best plan on the current pools then dropped a pool 11 times,
10 of them 30-810 s after the pool set last changed (docs/benchmarks.md).

Floors. A pool's `min_replicas` is an instance the loop keeps whatever the plan routes to
it, so the re-solve plans with it rather than around it (`with_floors`): every plan holds
the pool's floor, priced, and the solver routes to that capacity before it buys more
(scheduler.planner.solver, the floors' second solve). A floored pool runs in every plan,
so it is part of the pool set the hysteresis compares (`running_pools`), and the plan on
the current pools always includes it. Before this, on the ServeGen day of
docs/benchmarks.md the A10G floor was billed all day while the re-solved plans routed
nothing to it, and the swaps between 1x A10G + 1x L40S and 2x L40S were the A10G pool
emptied and filled again while its instance ran on. `PoolSetSwitch.resolve` applies the
floors and solves, so both drivers get them from the same call. It also prices each pool at
the loop's `scale_down_headroom` (the loop releases an instance only once the load fits
there, so that is the size a pool whose load moves runs at), falling back to `headroom`
and then the planner's own when the pools' maxima do not fit there (see `resolve`).

On the synthetic hour of docs/benchmarks.md ("Hysteresis on the re-solved plan (issue 12,
stop 23)") the re-solves without a margin swapped 6x L4 ($4.20/h at that load) for 1x
A100 ($3.67/h, 12.6% less) and back for 5x L4 ($3.50/h, 4.6% less): $3.89 for the hour
against $3.18 with the default margin of 0.2, which swaps nothing there (0.1 still swaps
twice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from scheduler.planner.problem import Plan, PlanError, PlanProblem
from scheduler.planner.solver import solve


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    interval_s: float = 60.0
    window_s: float = 300.0
    headroom: float = 0.2
    scale_down_headroom: float = 0.4
    dwell_s: float = 600.0
    idle_s: float = 600.0
    max_step: int = 4
    min_replicas: Mapping[str, int] = field(default_factory=dict)  # pool -> minimum (default 0)
    max_replicas: Mapping[str, int] = field(default_factory=dict)  # pool -> maximum (default: none)
    # A re-solved plan on other pools must cost less than (1 - switch_margin) x the current one
    switch_margin: float = 0.2
    # After a change of the pool set, none but a forced one (coverage) for this long
    switch_dwell_s: float = 1800.0

    def validate(self) -> None:
        if self.interval_s <= 0 or self.window_s <= 0:
            raise PlanError("autoscaler: interval_s and window_s must be positive")
        if not 0 <= self.headroom <= self.scale_down_headroom < 1:
            raise PlanError("autoscaler: expected 0 <= headroom <= scale_down_headroom < 1 (the hysteresis band), "
                            f"got {self.headroom} and {self.scale_down_headroom}")
        if self.dwell_s < 0 or self.idle_s < 0 or self.max_step < 1:
            raise PlanError("autoscaler: dwell_s and idle_s must be >= 0 and max_step >= 1")
        if not (isinstance(self.switch_margin, int | float) and 0 <= self.switch_margin < 1):
            raise PlanError("autoscaler: switch_margin: expected a fraction in [0, 1) (how much cheaper a re-solved "
                            f"plan on other pools must be than the current one), got {self.switch_margin!r}")
        if not (isinstance(self.switch_dwell_s, int | float) and 0 <= self.switch_dwell_s < math.inf):
            raise PlanError("autoscaler: switch_dwell_s: expected seconds >= 0 (how long a pool set stays after it "
                            f"changed, unless it cannot carry the load), got {self.switch_dwell_s!r}")


@dataclass(frozen=True, slots=True)
class PoolObservation:
    pool: str
    load_instances: float  # instance-equivalents of load over the window
    replicas: int  # the pool's current target (ready + starting)
    last_change_s: float  # when its target last changed (-inf: never)
    last_request_s: float  # last arrival routed to it (-inf: never)


def pool_loads(window_rates_rps: Mapping[int, float], shares: Sequence[Mapping[str, float]],
               capacity_rps: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Instance-equivalents of load per pool: bucket k's observed rate, split by the plan's
    shares, over the capacity of one instance of the pool for bucket k."""
    loads: dict[str, float] = {pool: 0.0 for pool in capacity_rps}
    for k, rate in window_rates_rps.items():
        for pool, share in shares[k].items():
            cap = capacity_rps[pool][k]
            if cap > 0 and rate > 0:
                loads[pool] = loads.get(pool, 0.0) + rate * share / cap
    return loads


def _needed(load: float, headroom: float) -> int:
    return math.ceil(load / (1.0 - headroom) - 1e-9) if load > 0 else 0


def decide_targets(config: AutoscalerConfig, observations: Sequence[PoolObservation], now_s: float) -> dict[str, int]:
    """The target replicas of every observed pool (see the module docstring)."""
    targets: dict[str, int] = {}
    for obs in observations:
        low = config.min_replicas.get(obs.pool, 0)
        high = config.max_replicas.get(obs.pool, 1 << 30)
        target = obs.replicas
        up = _needed(obs.load_instances, config.headroom)
        settled = now_s - obs.last_change_s >= config.dwell_s
        idle = now_s - obs.last_request_s >= config.idle_s
        if up > obs.replicas:
            target = min(up, obs.replicas + config.max_step)
        elif settled and idle:
            target = max(low, obs.replicas - config.max_step)
        elif settled:
            # Not idle yet: keep one instance warm until `idle_s` has passed without traffic.
            down = max(_needed(obs.load_instances, config.scale_down_headroom), 1)
            if down < obs.replicas:
                target = max(down, obs.replicas - config.max_step)
        targets[obs.pool] = min(high, max(low, target))
    return targets


@dataclass(frozen=True, slots=True)
class InstanceView:
    instance_id: str
    state: str  # "off", "starting", "ready", "draining"
    inflight: int = 0


@dataclass(frozen=True, slots=True)
class Actions:
    start: tuple[str, ...] = ()
    undrain: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()  # draining and empty: safe to stop now


def reconcile(instances: Sequence[InstanceView], target: int) -> Actions:
    """Instance actions that move one pool towards `target` (ready + starting)."""
    active = [i for i in instances if i.state in ("ready", "starting")]
    draining = [i for i in instances if i.state == "draining"]
    off = [i for i in instances if i.state == "off"]
    start: list[str] = []
    undrain: list[str] = []
    drain: list[str] = []
    if target > len(active):
        missing = target - len(active)
        # A draining instance is warm: taking it back is cheaper than a cold start.
        undrain = [i.instance_id for i in sorted(draining, key=lambda i: -i.inflight)[:missing]]
        missing -= len(undrain)
        start = [i.instance_id for i in off[:missing]]
    elif target < len(active):
        excess = len(active) - target
        # Starting instances first (nothing runs on them), then the emptiest ready ones.
        order = sorted(active, key=lambda i: (i.state != "starting", i.inflight, i.instance_id))
        drain = [i.instance_id for i in order[:excess]]
    remove = tuple(i.instance_id for i in draining if i.inflight == 0 and i.instance_id not in undrain)
    return Actions(tuple(start), tuple(undrain), tuple(drain), remove)


PlanReason = Literal["first", "same_pools", "steady", "uncovered", "cheaper", "kept", "dropped", "held"]


@dataclass(frozen=True, slots=True)
class PlanChoice:
    """What a re-solve does: `plan` is the plan to run from now on."""

    plan: Plan
    reason: PlanReason
    # the best plan on the current plan's pools at this load (inf: they cannot carry it;
    # nan: no current plan, or held); for a candidate on the same pools, what the current
    # plan's own shares cost at this load (inf: they do not carry it)
    keep_usd_per_hour: float
    candidate_usd_per_hour: float
    candidate: Plan | None = None  # the re-solve's own plan (`PoolSetSwitch.resolve` sets it)

    @property
    def pool_swap(self) -> bool:
        """The fleet's pool set changes (a swap, an added or a dropped pool)."""
        return self.reason in ("uncovered", "cheaper", "dropped")


def plan_pools(plan: Plan) -> frozenset[str]:
    """The pools a plan runs (instances > 0)."""
    return frozenset(plan.instances())


def floored_pools(problem: PlanProblem) -> frozenset[str]:
    """The pools the fleet runs whatever the plan (a floor above 0)."""
    return frozenset(o.name for o in problem.options if o.floor_replicas > 0)


def running_pools(plan: Plan, problem: PlanProblem) -> frozenset[str]:
    """The pools the fleet runs under `plan`: its own and the floored ones."""
    return plan_pools(plan) | floored_pools(problem)


def with_floors(problem: PlanProblem, config: AutoscalerConfig) -> PlanProblem:
    """`problem` with each pool's `config.min_replicas` as its floor (capped at the pool's
    `max_replicas`, as `decide_targets` caps it): the instances the loop keeps anyway."""
    options = []
    for option in problem.options:
        floor = config.min_replicas.get(option.name, 0)
        if option.max_replicas is not None:
            floor = min(floor, option.max_replicas)
        options.append(dataclasses.replace(option, floor_replicas=max(0, floor)))
    return dataclasses.replace(problem, options=tuple(options))


def at_loop_headroom(problem: PlanProblem, headroom: float) -> PlanProblem:
    """`problem` with each pool's headroom at least `headroom` (the loop's)."""
    by_pool = {o.name: max(problem.headroom_for(o.name), headroom) for o in problem.options}
    return dataclasses.replace(problem, headroom_by_pool=by_pool)


def carried_usd_per_hour(plan: Plan, problem: PlanProblem) -> float:
    """What `plan`'s own shares cost at `problem`'s rates (each pool at the instances its
    load needs at the planner's headroom, its minimum or its floor), or inf when they do not
    carry them: a bucket with traffic and no share, a share on a pool that is no option or
    does not serve the bucket, a pool past its `max_replicas`, a GPU type past its availability."""
    if len(plan.shares) != len(problem.buckets):
        return math.inf
    options = {o.name: o for o in problem.options}
    loads: dict[str, float] = {}
    for k, bucket in enumerate(problem.buckets):
        if bucket.rate_rps <= 0:
            continue
        if not plan.shares[k]:
            return math.inf
        for pool, share in plan.shares[k].items():
            option = options.get(pool)
            if option is None or option.capacity_rps[k] <= 0:
                return math.inf
            loads[pool] = loads.get(pool, 0.0) + bucket.rate_rps * share / option.capacity_rps[k]
    gpus: dict[str, int] = {}
    for pool in floored_pools(problem):  # run whatever the shares say
        loads.setdefault(pool, 0.0)
    usd = 0.0
    for pool, load in loads.items():
        option = options[pool]
        count = max(_needed(load, problem.headroom_for(pool)), option.min_replicas, option.floor_replicas)
        if option.max_replicas is not None and count > option.max_replicas:
            return math.inf
        gpus[option.gpu] = gpus.get(option.gpu, 0) + count * option.tp
        usd += count * option.usd_per_hour
    if not all(used <= problem.availability_gpus.get(gpu, used) for gpu, used in gpus.items()):
        return math.inf
    return usd


def carries(plan: Plan, problem: PlanProblem) -> bool:
    """Whether `plan`'s own shares carry `problem`'s rates (`carried_usd_per_hour` is finite)."""
    return math.isfinite(carried_usd_per_hour(plan, problem))


def keep_or_switch(current: Plan | None, candidate: Plan, problem: PlanProblem, config: AutoscalerConfig,
                   since_pool_change_s: float = math.inf, time_limit_s: float = 10.0) -> PlanChoice:
    """Run the re-solved `candidate` (solved from `problem`, the window's rates) or stay on
    the `current` plan's pools: the hysteresis on the pool set in the module docstring.
    `since_pool_change_s`: how long ago the pool set last changed (the dwell)."""
    if current is None:
        return PlanChoice(candidate, "first", math.nan, candidate.usd_per_hour)
    pools = running_pools(current, problem)  # a floored pool runs whatever the plan routes to it
    if running_pools(candidate, problem) == pools:
        # New shares move load between running pools: the one gaining it scales up at once,
        # the one losing it only after its dwell. So the current shares stay while they
        # carry the load and the candidate does not beat their cost by the margin.
        staying = carried_usd_per_hour(current, problem)
        if config.switch_margin > 0 and candidate.usd_per_hour >= (1.0 - config.switch_margin) * staying:
            return PlanChoice(current, "steady", staying, candidate.usd_per_hour)
        return PlanChoice(candidate, "same_pools", staying, candidate.usd_per_hour)
    held = since_pool_change_s < config.switch_dwell_s
    if held and carries(current, problem):
        return PlanChoice(current, "held", math.nan, candidate.usd_per_hour)
    on_current = dataclasses.replace(problem, options=tuple(o for o in problem.options if o.name in pools))
    if held:  # the current shares miss the load: re-balance, but on every current pool
        keeping = dataclasses.replace(on_current, options=tuple(
            dataclasses.replace(o, floor_replicas=max(o.floor_replicas, 1)) for o in on_current.options))
        try:
            rebalanced = solve(keeping, time_limit_s=time_limit_s)
        except PlanError:
            pass  # not without dropping one (or not at all): as outside the dwell
        else:
            return PlanChoice(rebalanced, "kept", rebalanced.usd_per_hour, candidate.usd_per_hour)
    try:
        if not on_current.options:
            raise PlanError("none of the current plan's pools is an option any more")
        keep = solve(on_current, time_limit_s=time_limit_s)
    except PlanError:
        return PlanChoice(candidate, "uncovered", math.inf, candidate.usd_per_hour)
    if not held and candidate.usd_per_hour < (1.0 - config.switch_margin) * keep.usd_per_hour:
        return PlanChoice(candidate, "cheaper", keep.usd_per_hour, candidate.usd_per_hour)
    return PlanChoice(keep, "kept" if running_pools(keep, problem) == pools else "dropped", keep.usd_per_hour,
                      candidate.usd_per_hour)


class PoolSetSwitch:
    """`keep_or_switch` with what it needs between re-solves, kept once for both drivers:
    when the pool set last changed (the dwell's clock) and the re-solves' choices
    (`keep`: the latest this many; None: all, as a simulated run reports them)."""

    def __init__(self, config: AutoscalerConfig, keep: int | None = None) -> None:
        self.config = config
        self.keep = keep
        self.last_pool_change_s = -math.inf
        self.choices: list[tuple[float, PlanChoice]] = []

    def resolve(self, current: Plan | None, problem: PlanProblem, now_s: float,
                time_limit_s: float = 10.0) -> PlanChoice:
        """A re-solve at `now_s` from `problem` (the window's rates, the pools' options): the
        loop's floors applied (`with_floors`), each pool at the loop's `scale_down_headroom`,
        solved, and decided (`keep_or_switch`); when no plan fits the pools' maxima there, or
        the current pools do not (`uncovered`), the same at the loop's `headroom`, then at the
        planner's own. Both drivers call this; PlanError when the solve fails (the
        driver keeps its plan).

        Why the scale-down headroom: the loop adds an instance once a pool's load passes
        `headroom` but releases one only once the load fits at `scale_down_headroom`, so a
        pool whose load moves runs near the larger size, and a plan priced at the smaller
        one favours fleets the loop then runs bigger. On the ServeGen day (docs/benchmarks.md,
        stop 24) the plans priced at `headroom` (0.3) held 28.1 A10G-hours where the loop ran
        41.0; re-solving at 0.3 / 0.4 / 0.5 cost $118.83 / $113.77 / $109.06 for the day
        (99.97 / 99.96 / 99.95% attainment) against $110.21 on the fixed plan. One day's
        measurement: the band, not the day, is the reason, but the figure is that day's."""
        floored = with_floors(problem, self.config)
        ladder = (at_loop_headroom(floored, self.config.scale_down_headroom),
                  at_loop_headroom(floored, self.config.headroom), floored)
        since_s = now_s - self.last_pool_change_s
        for sized in ladder:
            last = sized is ladder[-1]
            try:
                candidate = solve(sized, time_limit_s=time_limit_s)
            except PlanError:  # e.g. pools past their maximum at that headroom: the next, smaller one
                if last:
                    raise
                continue
            choice = keep_or_switch(current, candidate, sized, self.config, since_s, time_limit_s)
            # The current pools past their maximum at a headroom larger than the loop needs
            # is no reason to leave them: "uncovered" must hold at the next, smaller one too.
            if choice.reason != "uncovered" or last:
                return self._record(dataclasses.replace(choice, candidate=candidate), now_s)
        raise AssertionError("unreachable: the last rung returns or raises")

    def choose(self, current: Plan | None, candidate: Plan, problem: PlanProblem, now_s: float,
               time_limit_s: float = 10.0) -> PlanChoice:
        """The re-solve at `now_s`: `keep_or_switch`, recorded, the dwell's clock moved on a swap."""
        choice = keep_or_switch(current, candidate, problem, self.config, now_s - self.last_pool_change_s, time_limit_s)
        return self._record(dataclasses.replace(choice, candidate=candidate), now_s)

    def _record(self, choice: PlanChoice, now_s: float) -> PlanChoice:
        self.choices.append((now_s, choice))
        if self.keep is not None:
            del self.choices[:-self.keep]
        if choice.pool_swap:
            self.last_pool_change_s = now_s
        return choice
