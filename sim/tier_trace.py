"""Traces with prompts attached, for simulating tier routing: the arrivals and token counts
of a real trace (e.g. the Azure conversation trace) joined with prompts that carry a
tier score and the small and large tier's held-out quality on them.

The join is deterministic (a seeded shuffle of the prompts, reused in order), so two runs
of the same policy see the same prompt on the same request; `quality` reads back the
expected quality of a run from the model each request was served by.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from sim.workload import TraceRequest


@dataclass(frozen=True, slots=True)
class ScoredPrompt:
    """A prompt with its tier score and each tier's quality on it (scores in [0, 1])."""

    prompt: str
    p_small_ok: float
    q_small: float
    q_large: float


def with_prompts(arrivals: Iterable[TraceRequest], prompts: Sequence[ScoredPrompt], *, alias: str = "auto",
                 seed: int = 0) -> Iterator[tuple[TraceRequest, ScoredPrompt]]:
    """Each arrival asking for `alias`, with the next prompt of a seeded shuffle attached."""
    if not prompts:
        raise ValueError("with_prompts: expected at least one prompt")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    for k, req in enumerate(arrivals):
        scored = prompts[order[k % len(order)]]
        yield replace(req, model=alias, prompt=scored.prompt, p_small_ok=scored.p_small_ok), scored


def burst(requests: Sequence[TraceRequest], factor: float, start_s: float, end_s: float) -> list[TraceRequest]:
    """The trace with `factor` x the arrival rate inside [start_s, end_s): the requests of
    `factor` x that span (further trace rows, moved in) arrive within it, then the trace
    resumes after them, shifted back by the time saved."""
    if not factor >= 1.0 or not 0.0 <= start_s < end_s:
        raise ValueError(f"burst: expected factor >= 1 and 0 <= start < end, got {factor}, {start_s}, {end_s}")
    span_end = start_s + (end_s - start_s) * factor  # the trace time squeezed into the burst
    out = []
    for req in requests:
        t = req.arrival_s
        if t < start_s:
            new_t = t
        elif t < span_end:
            new_t = start_s + (t - start_s) / factor
        else:
            new_t = t - (span_end - end_s)
        out.append(replace(req, arrival_s=new_t))
    return out


def quality(served_model: Mapping[str, str], scored: Mapping[str, ScoredPrompt], small_model: str) -> float:
    """Mean quality over the served requests: q_small where the small model answered."""
    if not served_model:
        return float("nan")
    total = 0.0
    for request_id, model in served_model.items():
        prompt = scored[request_id]
        total += prompt.q_small if model == small_model else prompt.q_large
    return total / len(served_model)
