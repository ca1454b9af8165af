"""The observed workload, recorded by every router replica into the state store.

The control plane plans from the length histogram of finished requests (input and output
tokens, per model and SLO class, per time slot: `scheduler.planner.histogram`). Each
router replica:

- wraps the client `send` of an answered request in a `UsageMeter`, which sees the
  response bytes as they pass and keeps references to the last two chunks (the OpenAI
  `usage` object comes last, in the body or in the final stream chunk with
  `stream_options.include_usage`; hand-written because no library meters ASGI sends, and
  bench/controlplane.py measures what it adds per request); a stream without `usage` counts its SSE events as the
  output tokens (vLLM sends one event per step, so this is a lower bound);
- `finished()` adds one count to an in-memory dict keyed by (model, slot, class, input
  bucket, output bucket): O(1) and no I/O on the request path;
- every `flush_interval_s` a background task folds those counts into one
  `LengthHistogram` per model, drops slots older than `keep_slots`, and writes
  `{"replica", "models": {model: histogram.as_dict()}}` to the store under
  `workload:<replica id>` (the store's load table, with a TTL of the histogram's span, so
  a replica that died stops counting once its data would be stale anyway).

`read_workload(store)` merges every replica's document into one histogram per model; that
is what `tokenyard controlplane` reads. Memory is bounded: at most `max_models` models
(more are counted in `dropped` and not recorded), and per model `keep_slots` x classes x
buckets cells. Times are wall-clock seconds so that slots of different replicas line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from router.state import StateStore
from scheduler.planner.histogram import LengthHistogram
from scheduler.planner.problem import PlanError
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)

STORE_KEY_PREFIX = "workload:"
DEFAULT_INPUT_EDGES = (0, 256, 1024, 2048, 4096, 8192)  # the planner's default buckets (docs/planner.md)
DEFAULT_OUTPUT_EDGES = (0, 64, 256, 1024)
TAIL_BYTES = 2048  # the usage object is ~100 bytes; vLLM writes it last
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
# A chat delta's or a completion choice's non-empty text: one per content event of a stream.
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class UsageMeter:
    """An ASGI `send` that passes every message on and remembers the status, the number
    of SSE events and the last two body chunks (references, no copy: the `usage` object
    sits in the last one or two). For the request records (router/records.py), with
    `detail=True`, also the first body chunk and when it went out, the instance that
    answered (the `x-tokenyard-instance` header) and the router's in-flight count on it
    then (`inflight_of`): what `output_tokens` reads a stream's token count from when it
    has no `usage`."""

    __slots__ = ("_send", "status", "_prev", "_last", "events", "detail", "first_body_s", "_first", "instance",
                 "inflight", "inflight_of")

    def __init__(self, send: Send, *, detail: bool = False,
                 inflight_of: Callable[[str], int | None] | None = None) -> None:
        self._send = send
        self.status = 0
        self._prev = b""
        self._last = b""
        self._first = b""
        self.events = 0
        self.detail = detail
        self.first_body_s: float | None = None
        self.instance: str | None = None
        self.inflight: int | None = None
        self.inflight_of = inflight_of

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        # Not a coroutine itself: it returns the wrapped send's awaitable, so a relayed
        # message costs no extra coroutine frame (a stream sends one per chunk).
        body = message.get("body")
        if body:
            self.events += body.count(b"data: ")
            self._prev, self._last = self._last, body
            if self.detail and self.first_body_s is None:
                self.first_body_s = time.monotonic()
                self._first = body
        elif message.get("type") == "http.response.start":
            self.status = int(message.get("status", 0))
            if self.detail:
                self._started(message.get("headers") or ())
        return self._send(message)

    def _started(self, headers: Any) -> None:
        for name, value in headers:
            if name == b"x-tokenyard-instance":
                self.instance = value.decode("latin-1")
                if self.inflight_of is not None:
                    self.inflight = self.inflight_of(self.instance)
                return

    @property
    def tail(self) -> bytes:
        last = self._last
        if len(last) >= TAIL_BYTES or not self._prev:  # one chunk holds it: no concatenation
            return bytes(last[-TAIL_BYTES:])
        return (bytes(self._prev) + bytes(last))[-TAIL_BYTES:]

    def usage(self) -> tuple[int | None, int | None]:
        """(prompt tokens, completion tokens) from the answer's `usage`; a stream without
        one gives (None, events not counting `[DONE]`)."""
        tail = self.tail
        completion = _last_match(_COMPLETION, b'"completion_tokens"', tail)
        if completion is not None:
            return _last_match(_PROMPT, b'"prompt_tokens"', tail), completion
        if self.events:
            return None, max(0, self.events - tail.count(b"[DONE]"))
        return None, None

    def output_tokens(self) -> tuple[int | None, str]:
        """(output tokens, "usage" | "events" | "none"): from the `usage` block; else, for a
        stream, its SSE events less those without text. Events without text (the chat role
        chunk, a closing finish_reason chunk, `[DONE]`) lead or trail, so only the first
        chunk's leading events and the last two chunks' trailing ones are parsed, once, here,
        up to the first with text: a few regex searches per stream, however long (sends
        often carry many events each), and nothing per chunk (`detail` only)."""
        completion = _COMPLETION.findall(self.tail)
        if completion:
            return int(completion[-1]), "usage"
        if not self.events or not self.detail:
            return None, "none"
        first = _data_events(self._first)
        leading = next((i for i, event in enumerate(first) if _CONTENT.search(event)), None)
        if leading is None:  # no text in the first chunk: all of it is text-less
            empty, trailing_from = len(first), [self._last, self._prev]
            trailing_from = [c for c in trailing_from if c is not self._first]
        else:
            empty, trailing_from = leading, [self._last, self._prev]
        seen: list[bytes] = []
        for chunk in trailing_from:
            if not chunk or any(chunk is other for other in seen):
                continue
            seen.append(chunk)
            events = _data_events(chunk)
            text_at = next((i for i in range(len(events) - 1, -1, -1) if _CONTENT.search(events[i])), None)
            empty += len(events) - 1 - text_at if text_at is not None else len(events)
            if text_at is not None:
                break
        return max(0, self.events - empty), "events"


def _data_events(chunk: bytes) -> list[bytes]:
    return [e for e in bytes(chunk).split(b"\n\n") if e.startswith(b"data: ")] if chunk else []


def _last_match(pattern: re.Pattern[bytes], key: bytes, tail: bytes) -> int | None:
    """The number of the last `"key": N` in `tail`: the last occurrence of the key tried
    first (one C search from the end, not a scan for all), all of them if that one is not
    followed by a number."""
    at = tail.rfind(key)
    if at < 0:
        return None
    found = _number_after(tail, at + len(key))
    if found is not None:
        return found
    every = pattern.findall(tail, 0, at)
    return int(every[-1]) if every else None


def _number_after(data: bytes, at: int) -> int | None:
    """N when `data[at:]` starts with `\\s*:\\s*N` (N: ASCII digits), else None: the regex
    `_PROMPT`/`_COMPLETION` past its key, as a byte loop. Compiled, `UsageMeter.usage`
    went from ~12,900 to ~7,300 instructions per answer with it (two regex matches and
    their match objects replaced; callgrind of bench/router_instructions.py's load,
    docs/benchmarks.md issue 17 stop 24); tests/test_controlplane_workload.py compares
    it with the regex."""
    end = len(data)
    i = _skip_space(data, at, end)
    if i >= end or data[i] != 58:  # ':'
        return None
    i = _skip_space(data, i + 1, end)
    start = i
    while i < end and 48 <= data[i] <= 57:
        i += 1
    return int(data[start:i]) if i > start else None


def _skip_space(data: bytes, i: int, end: int) -> int:
    """Past the ASCII whitespace at `data[i:]` (what `\\s` matches in a bytes pattern)."""
    while i < end:
        byte = data[i]
        if byte != 32 and not 9 <= byte <= 13:
            break
        i += 1
    return i


def _bucket_of(edges: tuple[int, ...], tokens: int) -> int:
    """`scheduler.planner.problem.bucket_of`, the same search step for step (so the same
    index for any edges, sorted or not; tests/test_controlplane_workload.py compares them),
    compiled with this module in the router's --native build: the two plain calls per
    request were 7,500 instructions of `record` (callgrind, non-streaming c=32, issue #17)."""
    lo, hi = 0, len(edges) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edges[mid] <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


class WorkloadRecorder:
    """One router replica's side of the shared workload histogram."""

    def __init__(self, store: StateStore, replica_id: str | None = None, *,
                 input_edges: Sequence[int] = DEFAULT_INPUT_EDGES, output_edges: Sequence[int] = DEFAULT_OUTPUT_EDGES,
                 slot_s: float = 60.0, keep_slots: int = 30, flush_interval_s: float = 5.0, max_models: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        if len(input_edges) < 2 or len(output_edges) < 2 or slot_s <= 0 or keep_slots < 1 or flush_interval_s <= 0:
            raise ValueError("workload recorder: expected >= 2 edges per axis, slot_s > 0, keep_slots >= 1 and "
                             "flush_interval_s > 0")
        self.store = store
        # Unique per process and start: two replicas (or a restarted one) never share a key.
        self.replica_id = replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.input_edges = tuple(int(e) for e in input_edges)
        self.output_edges = tuple(int(e) for e in output_edges)
        self.slot_s = float(slot_s)
        self.keep_slots = keep_slots
        self.flush_interval_s = flush_interval_s
        self.max_models = max_models
        self.clock = clock
        self.dropped = 0
        self.recorded = 0
        self._pending: dict[tuple[str, int, str, int, int], int] = {}
        self._histograms: dict[str, LengthHistogram] = {}
        self._task: asyncio.Task[None] | None = None
        self._warn = RateLimitedLog(log, interval_s=30.0)

    # -- the request path (no I/O) ---------------------------------------------------------
    @staticmethod
    def meter(send: Send) -> UsageMeter:
        return UsageMeter(send)

    def finished(self, model: str, slo_class: str, estimated_input_tokens: int, meter: UsageMeter) -> None:
        """Count one answered request (status 200); others say nothing about capacity needs."""
        if meter.status != 200:
            return
        prompt, completion = meter.usage()
        if completion is None:
            return
        self.record(model, slo_class, prompt if prompt is not None else estimated_input_tokens, completion)

    def record(self, model: str, slo_class: str, input_tokens: int, output_tokens: int) -> None:
        if model not in self._histograms:
            if len(self._histograms) >= self.max_models:
                self.dropped += 1
                return
            self._histograms[model] = LengthHistogram(self.input_edges, self.output_edges, self.slot_s,
                                                      self.keep_slots)
        key = (model, int(self.clock() // self.slot_s), slo_class, _bucket_of(self.input_edges, input_tokens),
               _bucket_of(self.output_edges, output_tokens))
        self._pending[key] = self._pending.get(key, 0) + 1
        self.recorded += 1

    # -- flushing ----------------------------------------------------------------------
    def fold(self) -> dict[str, LengthHistogram]:
        """Move the pending counts into the histograms and drop expired slots."""
        pending, self._pending = self._pending, {}
        for (model, slot, klass, i, j), count in pending.items():
            counts = self._histograms[model].counts
            counts[(slot, klass, i, j)] = counts.get((slot, klass, i, j), 0) + count
        oldest = int(self.clock() // self.slot_s) - self.keep_slots
        for hist in self._histograms.values():
            if any(k[0] < oldest for k in hist.counts):
                hist.counts = {k: v for k, v in hist.counts.items() if k[0] >= oldest}
        return self._histograms

    async def flush(self) -> None:
        doc = {"replica": self.replica_id,
               "models": {model: hist.as_dict() for model, hist in self.fold().items() if hist.counts}}
        await self.store.put_load(STORE_KEY_PREFIX + self.replica_id, doc, ttl_s=self.keep_slots * self.slot_s)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception as exc:  # the store being down loses nothing: counts stay folded
                self._warn.warning("flush", "workload histogram not flushed", extra={"error": str(exc)})

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="workload-recorder")

    async def stop(self) -> None:
        """Stop the flusher and write the last counts."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()


def merge_documents(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, LengthHistogram]:
    """Every replica's `workload:` document merged into one histogram per model. A
    document that does not parse, or whose edges differ from the first seen, is skipped
    (logged): one misconfigured replica must not blind the control loop."""
    merged: dict[str, LengthHistogram] = {}
    for key, doc in sorted(docs.items()):
        if not key.startswith(STORE_KEY_PREFIX):
            continue
        models = doc.get("models") if isinstance(doc, Mapping) else None
        if not isinstance(models, Mapping):
            log.warning("workload document skipped", extra={"key": key, "error": "expected a models mapping"})
            continue
        for model, raw in models.items():
            try:
                hist = LengthHistogram.from_dict(raw, where=f"{key}.models.{model}")
                merged[str(model)] = merged[str(model)].merge(hist) if str(model) in merged else hist
            except PlanError as exc:
                log.warning("workload document skipped", extra={"key": key, "model": model, "error": str(exc)})
    return merged


async def read_workload(store: StateStore) -> dict[str, LengthHistogram]:
    """The fleet's observed workload: every live replica's histogram, merged per model."""
    return merge_documents(await store.get_loads())
