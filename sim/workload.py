"""The request records that traces produce and both drivers consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TraceRequest:
    """One request of a workload: when it arrives, how long its prompt and output are."""

    request_id: str
    arrival_s: float  # seconds from the start of the trace
    input_tokens: int
    output_tokens: int
    prefix_hashes: tuple[int, ...] = ()  # leading prompt blocks, `prefix_block_tokens` each
    prefix_block_tokens: int = 16
    tenant: str = "default"
    slo_class: str = "default"
    model: str | None = None  # None: the cluster's default model
    session_id: str | None = None
    prompt: str | None = None
    p_small_ok: float | None = None  # the tier predictor's score of `prompt` (tier routing)
