"""Prefill tokens per second arriving at each instance: the load signal behind a long
prompt's cost to everyone else on its engine.

A prompt's prefill shares iterations with the running requests' decode steps, so while
an engine takes prompt tokens at `rate` tokens/s, about `rate x prefill time per token`
of its time goes to prefill and each decode step stretches by 1 / (1 - that share).
Prefill-heavy traffic (code completion: long prompts, short answers) misses its TPOT
this way before any queue forms, so the TTFT predicted from running and waiting counts
does not see it (docs/benchmarks.md, "Tier routing").

Both drivers call `note_dispatch` when they hand a request to an instance (the router's
registry on every forwarding attempt, the simulator when its engine takes the request),
with the same clock their decisions read (`RequestInfo.arrival_s`), and readers call
`prefill_tokens_per_s`. The estimate is an exponentially decayed event rate:

    rate(t) = rate(t0) x exp(-(t - t0) / tau) + tokens / tau      (at a dispatch at t)

which is the mean arrival rate over the last ~tau seconds and decays to 0 when nothing
arrives; `tau` is PREFILL_RATE_TAU_S, short enough to see a burst within its first
requests.
"""

from __future__ import annotations

import math

from scheduler.types import InstanceState

PREFILL_RATE_TAU_S = 1.0


def prefill_tokens_per_s(state: InstanceState, now_s: float, tau_s: float | None = None) -> float:
    """The instance's prompt-token arrival rate at `now_s` (tokens/s)."""
    if tau_s is None:
        tau_s = PREFILL_RATE_TAU_S
    rate = state.prefill_tokens_per_s
    elapsed_s = now_s - state.prefill_rate_at_s
    if rate <= 0.0 or elapsed_s <= 0.0:
        return rate
    return rate * math.exp(-elapsed_s / tau_s)


def note_prefill(state: InstanceState, prompt_tokens: int, now_s: float, tau_s: float | None = None) -> None:
    """`prompt_tokens` dispatched to the instance at `now_s` (a clock that never goes back)."""
    if prompt_tokens <= 0:
        return
    if tau_s is None:
        tau_s = PREFILL_RATE_TAU_S
    state.prefill_tokens_per_s = prefill_tokens_per_s(state, now_s, tau_s) + prompt_tokens / tau_s
    if now_s > state.prefill_rate_at_s:
        state.prefill_rate_at_s = now_s


def note_dispatch(state: InstanceState, prompt_tokens: int, now_s: float) -> None:
    """A request handed to the instance: one more in flight, its prompt in the rate."""
    state.router_inflight += 1
    note_prefill(state, prompt_tokens, now_s)
