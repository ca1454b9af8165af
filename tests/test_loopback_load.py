"""bench/loopback_load.py's open loop: the seeded arrival schedule the live benches share."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is scripts, not an installed package

from bench.loopback_load import offer_poisson  # noqa: E402


def _schedule(rate_rps: float, seed: int, duration_s: float) -> list[float]:
    rng = random.Random(seed)
    out, t = [], 0.0
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate_rps)
    return out


def test_duration_bounded_open_loop_sends_the_seeded_schedule_on_time() -> None:
    sent: list[tuple[int, float]] = []
    started = time.monotonic()

    async def send(_client: httpx.AsyncClient, item: int, rows: list[dict[str, Any]]) -> None:
        sent.append((item, time.monotonic() - started))
        await asyncio.sleep(0.05)  # open loop: later sends do not wait for this one
        rows.append({"item": item})

    rows, span_s = asyncio.run(offer_poisson(itertools.count(), 100.0, 7, send, timeout_s=5.0, duration_s=0.3))
    expected = _schedule(100.0, 7, 0.3)
    assert [item for item, _ in sent] == list(range(len(expected)))
    assert sorted(r["item"] for r in rows) == list(range(len(expected)))
    # never early (each waits for its arrival time); the last answer ends the span
    assert all(at >= due - 0.01 for (_, at), due in zip(sent, expected, strict=True))
    assert span_s >= expected[-1] + 0.05


def test_item_bounded_loop_stops_at_the_items_end_and_is_reproducible() -> None:
    async def send(_client: httpx.AsyncClient, item: str, rows: list[dict[str, Any]]) -> None:
        rows.append({"item": item})

    first, _ = asyncio.run(offer_poisson(["a", "b", "c"], 1000.0, 3, send, timeout_s=5.0))
    second, _ = asyncio.run(offer_poisson(["a", "b", "c"], 1000.0, 3, send, timeout_s=5.0))
    assert [r["item"] for r in first] == [r["item"] for r in second] == ["a", "b", "c"]
