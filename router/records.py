"""The router's request records: one JSON line per finished request, streamed or not.

What reads them: `tokenyard calibrate --from RECORDS.jsonl` (engine factors from the live
fleet, sim/calibrate_from.py), `tokenyard train rank --data RECORDS.jsonl` (the ranker's
retraining loop, learn/rank_data.py) and `tokenyard policy apply --dry-run=server` (the
Admin `RecentRecords` call replays the last hour in the simulator, cli/policy_replay.py).
The columns are those of the simulator's records (sim/records.py, `tokenyard sim
--records`), so the same readers take both:

    request_id tenant slo_class model pool instance_id gpu arrival_s dispatch_s
    first_token_s finish_s input_tokens output_tokens rejected reject_reason
    ttft_slo_s tpot_slo_s ttft_ms tpot_ms e2e_ms            (as the simulator writes them)
    status stream max_tokens instance_inflight output_tokens_from   (live only)
    feature_spec dense [instruction_text]                   (when the ranker is on)
    prompt                                                  (only with include_prompt_text)

Times are wall-clock Unix seconds (the simulator's are seconds from its trace's start; both
readers only take differences). `first_token_s` is the first body byte the client got: the
first token of a stream; null for a non-streamed answer (its first byte is its last).
`output_tokens` comes from the answer's `usage` block (`output_tokens_from: "usage"`) or,
for a stream without one, counts its SSE events less those without text (`"events"`: vLLM
sends one token per event, so this is a lower bound under speculative decoding).
`instance_inflight` is the router's count of requests in flight on the answering instance
when the answer began (this one included).

Config (router YAML; no `records` section = off; `tokenyard up` turns it on into its
state dir):

    records:
      path: /var/lib/tokenyard/records.jsonl
      max_bytes: 104857600        # then it rotates: path.1 ... path.<keep_files>
      keep_files: 3
      queue_max: 10000            # records waiting for the writer; beyond, dropped and counted
      include_prompt_text: false  # privacy: no prompt text unless set (see below)

Privacy: with `include_prompt_text: false` (the default) a record holds lengths, times and
names, never text: the ranker's features are its dense statistics only (the last user turn
the ranker hashes is left out, so a retrained model learns from those statistics). With
`true`, `instruction_text` (the ranker's view of the last user turn, at most 2,000 chars)
and `prompt` (the prompt or last user message, at most `MAX_PROMPT_CHARS`) are written.

Bounded and never in the way: the request path captures a tuple of values and appends it
to a bounded queue without waiting; one writer thread, woken every 50 ms, builds the
records, serialises and appends them (batched, one `write` per batch). A full queue or a
write error drops the record and counts it in `tokenyard_router_records_dropped_total{reason}`;
no request fails for its record. A queue-and-thread of its own, not the stdlib's
`logging.handlers.QueueHandler` + `QueueListener` + `RotatingFileHandler`: those build a
`LogRecord` and format it on the caller's thread (the event loop) and write line by line;
bench/records_cost.py measures both on the caller's side (docs/benchmarks.md, "Router
request records").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from scheduler.predictors.features import FEATURE_SPEC_VERSION
from tokenyard.config import ConfigError
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_KEEP_FILES = 3
DEFAULT_QUEUE_MAX = 10_000
MAX_PROMPT_CHARS = 4000
CLIENT_GONE_STATUS = 499  # as router/app.py counts a client that left
WRITE_BATCH = 512  # records per write() at most
FLUSH_INTERVAL_S = 0.05  # the writer thread drains the queue this often
SECTION_KEYS = ("path", "max_bytes", "keep_files", "queue_max", "include_prompt_text")
# What one RecentRecords answer may carry at most (the Admin call's own caps are lower by default).
MAX_READ_RECORDS = 200_000
MAX_READ_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecordsSettings:
    path: str
    max_bytes: int = DEFAULT_MAX_BYTES
    keep_files: int = DEFAULT_KEEP_FILES
    queue_max: int = DEFAULT_QUEUE_MAX
    include_prompt_text: bool = False
    # Every records file RecentRecords reads (the files of all `tokenyard router --workers`
    # processes); empty: `path` alone.
    read_paths: tuple[str, ...] = ()


def worker_path(path: str, index: int) -> str:
    """records.jsonl -> records.w<index>.jsonl"""
    base = Path(path)
    return str(base.with_name(f"{base.stem}.w{index}{base.suffix}"))


def per_worker(config: Any, index: int, workers: int) -> Any:
    """The router config of worker `index` of `workers` processes: its own records file
    (two processes rotating one file would lose records), and all of them to read."""
    settings = getattr(config, "records", None)
    if settings is None:
        return config
    paths = tuple(worker_path(settings.path, i) for i in range(workers))
    return dataclasses.replace(config, records=dataclasses.replace(settings, path=paths[index], read_paths=paths))


def _int_at_least(raw: Mapping[str, Any], key: str, default: int, minimum: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def parse_records_section(raw: Any, where: str) -> RecordsSettings | None:
    """The `records` section of the router config, checked; None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping {{path, max_bytes, ...}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(where, f"unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(SECTION_KEYS)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{where}.path", f"expected a file path (e.g. /var/lib/tokenyard/records.jsonl), got {path!r}")
    include = raw.get("include_prompt_text", False)
    if not isinstance(include, bool):
        raise ConfigError(f"{where}.include_prompt_text", f"expected true or false, got {include!r}")
    return RecordsSettings(
        path=path, max_bytes=_int_at_least(raw, "max_bytes", DEFAULT_MAX_BYTES, 4096, where),
        keep_files=_int_at_least(raw, "keep_files", DEFAULT_KEEP_FILES, 1, where),
        queue_max=_int_at_least(raw, "queue_max", DEFAULT_QUEUE_MAX, 1, where), include_prompt_text=include)


def rank_log_alias(rank_log_path: str, max_bytes: int) -> RecordsSettings:
    """`rank.log` of older configs: the records facility at that path. The rank log held the
    ranker's view of the prompt, so the alias keeps prompt text on (say `records:` instead
    to turn it off)."""
    return RecordsSettings(path=rank_log_path, max_bytes=max_bytes, keep_files=1, include_prompt_text=True)


class RecordsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter("tokenyard_router_records_written", "Request records written to the records file",
                               registry=registry)
        self.dropped = Counter("tokenyard_router_records_dropped",
                               "Request records not written, by reason (queue_full, write_error)", ["reason"],
                               registry=registry)
        self.queued = Gauge("tokenyard_router_records_queued", "Request records waiting for the writer thread",
                            registry=registry)
        self.dropped_full = self.dropped.labels("queue_full")
        self.dropped_error = self.dropped.labels("write_error")


class RecordWriter:
    """A bounded queue and one thread appending its records as JSON lines, rotating at
    `max_bytes` to path.1 ... path.<keep_files> (the oldest goes).

    The queue is a deque the thread drains every `FLUSH_INTERVAL_S` (append and popleft are
    atomic under the GIL): a request pays one append, and the thread wakes 20 times a second
    whatever the request rate, instead of once per record as a `queue.Queue` consumer would
    (measured in bench/records_cost.py). An item that is not a dict is turned into one by
    `build`, on the thread: the request path only captures values."""

    def __init__(self, settings: RecordsSettings, metrics: RecordsMetrics,
                 build: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.metrics = metrics
        self.build = build
        self._pending: deque[Any] = deque()
        self._stop = threading.Event()
        self._warn = RateLimitedLog(log, interval_s=30.0)
        self._size = -1  # bytes in the current file; -1: not looked at yet
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # counted as write errors from the first record on
            log.warning("cannot create the records folder", extra={"path": str(self.path), "error": str(exc)})
        self._thread = threading.Thread(target=self._run, name="tokenyard-records", daemon=True)
        self._thread.start()

    def submit(self, record: Any) -> bool:
        """Queue one record (never waits); False when it was dropped."""
        if len(self._pending) >= self.settings.queue_max:
            self.metrics.dropped_full.inc()
            self._warn.warning("full", "request records dropped: the writer is behind",
                               extra={"path": str(self.path), "queue_max": self.settings.queue_max})
            return False
        self._pending.append(record)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(FLUSH_INTERVAL_S)
            while self._pending:
                batch: list[Any] = []
                while self._pending and len(batch) < WRITE_BATCH:
                    batch.append(self._pending.popleft())
                self._write(batch)
            self.metrics.queued.set(len(self._pending))
            if stopping:
                return

    def _write(self, batch: list[Any]) -> None:
        lines = []
        for item in batch:
            try:
                record = item if self.build is None or isinstance(item, dict) else self.build(item)
                lines.append(orjson.dumps(record) + b"\n")
            except (TypeError, ValueError, AttributeError) as exc:  # a value orjson cannot write: a bug, never the request's problem
                self.metrics.dropped_error.inc()
                self._warn.warning("encode", "request record not serialisable", extra={"error": str(exc)})
        start = 0
        try:
            if self._size < 0:
                self._size = self.path.stat().st_size if self.path.exists() else 0
            while start < len(lines):
                # As many lines as fit in the current file (at least one, into an empty file).
                end, size = start, self._size
                while end < len(lines) and (size == 0 or size + len(lines[end]) <= self.settings.max_bytes):
                    size += len(lines[end])
                    end += 1
                if end == start:
                    self._rotate()
                    continue
                self._append(b"".join(lines[start:end]))
                self.metrics.written.inc(end - start)
                start = end
        except OSError as exc:
            self._size = -1
            self.metrics.dropped_error.inc(len(lines) - start)
            self._warn.warning("write", "cannot write request records",
                               extra={"path": str(self.path), "error": str(exc)})

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._size += len(data)

    def _rotate(self) -> None:
        keep = self.settings.keep_files
        for index in range(keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path.with_name(f"{self.path.name}.{index - 1}") if index > 1 else self.path
            if newer.exists():
                os.replace(newer, older)
        self._size = 0


def record_files(path: str | Path, keep_files: int) -> list[Path]:
    """The records files, oldest first (path.N ... path.1, path)."""
    base = Path(path)
    rotated = [base.with_name(f"{base.name}.{i}") for i in range(keep_files, 0, -1)]
    return [p for p in (*rotated, base) if p.exists()]


def read_recent(path: str | Path, keep_files: int, since_s: float, max_records: int,
                max_bytes: int) -> tuple[list[bytes], bool]:
    """The JSON lines of records that arrived at or after `since_s` (Unix seconds), in the
    order written, at most the last `max_records` of them and `max_bytes` in all (the
    newest kept); True when some were left out for those limits. Blocking file reads: call
    it off the event loop."""
    max_records = max(1, min(max_records, MAX_READ_RECORDS))
    max_bytes = max(1, min(max_bytes, MAX_READ_BYTES))
    kept: deque[bytes] = deque()
    size = 0
    truncated = False
    for file in record_files(path, keep_files):
        try:
            if file.stat().st_mtime < since_s:
                continue  # written (so finished) before the window began: nothing in it can be newer
            handle = file.open("rb")
        except OSError:
            continue  # rotated away meanwhile
        with handle:
            for line in _lines(handle):
                arrival = _arrival_s(line)
                if arrival is None or arrival < since_s:
                    continue
                kept.append(line)
                size += len(line)
                while len(kept) > max_records or size > max_bytes:
                    size -= len(kept.popleft())
                    truncated = True
    return list(kept), truncated


def _lines(handle: Any) -> Iterator[bytes]:
    for line in handle:
        line = line.rstrip(b"\n")
        if line and len(line) < (1 << 20):
            yield line


def _arrival_s(line: bytes) -> float | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # a line being written, or garbage: not a record
    value = doc.get("arrival_s") if isinstance(doc, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def prompt_text(body: Mapping[str, Any]) -> str | None:
    """The prompt, or the last user message's text, cut to MAX_PROMPT_CHARS."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
    if not isinstance(prompt, str):
        prompt = None
        for message in reversed(body.get("messages") or []):
            if isinstance(message, Mapping) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
                prompt = content if isinstance(content, str) else None
                break
    return None if prompt is None else prompt[:MAX_PROMPT_CHARS]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class RequestRecords:
    """The router's side: captures each finished request's values (on the event loop: a
    tuple and a deque append) and has the writer thread build and write its record."""

    def __init__(self, settings: RecordsSettings, registry: CollectorRegistry, *,
                 slo_targets_s: Callable[[str], tuple[float, float]],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics = RecordsMetrics(registry)
        self.writer = RecordWriter(settings, self.metrics, build=self._build)
        self.slo_targets_s = slo_targets_s
        self.wall_clock = wall_clock

    # -- the router's two hooks (router/app.py) ---------------------------------------------
    def answered(self, router: Any, info: Any, tenant: Any, meter: Any, started_s: float, body: Mapping[str, Any],
                 stream: bool, client_left: bool) -> bool:
        """A dispatched request ended (answered, failed upstream, or the client left).
        `meter` (router.workload_recorder.UsageMeter, detail on) is read on the writer
        thread: nothing writes to it once the request is over."""
        instance = None
        if meter.instance is not None:
            found = router.registry.find(meter.instance)
            instance = (meter.instance, *((found[0].pool, found[0].gpu) if found is not None else ("", "")))
        status = CLIENT_GONE_STATUS if client_left else (meter.status or 500)
        features = router.ranker.take_features(info.request_id) if router.ranker is not None else None
        prompt = prompt_text(body) if self.settings.include_prompt_text else None
        return self.writer.submit((
            self.wall_clock(), time.monotonic(), started_s, info.request_id, tenant.name, tenant.slo_class,
            info.model, info.input_tokens, info.max_output_tokens, stream, status, instance, meter.first_body_s,
            meter if meter.status == 200 else None, meter.inflight,
            "" if instance is not None else f"HTTP {status} before an engine answered", features, prompt))

    def refused(self, router: Any, info: Any, tenant: Any, started_s: float, body: Mapping[str, Any], stream: bool,
                status: int, reason: str) -> bool:
        """A request turned away before dispatch (admission queue, no instance)."""
        features = router.ranker.take_features(info.request_id) if router.ranker is not None else None
        prompt = prompt_text(body) if self.settings.include_prompt_text else None
        return self.writer.submit((
            self.wall_clock(), time.monotonic(), started_s, info.request_id, tenant.name, tenant.slo_class,
            info.model, info.input_tokens, info.max_output_tokens, stream, status, None, None, None, None,
            reason[:200], features, prompt))

    def _build(self, item: tuple[Any, ...]) -> dict[str, Any]:
        """The record of one captured request (on the writer thread)."""
        (wall_s, mono_s, started_s, request_id, tenant, slo_class, model, input_tokens, max_tokens, stream, status,
         instance, first_byte_s, meter, inflight, reject_reason, features, prompt) = item
        arrival_s = wall_s - (mono_s - started_s)
        rejected = instance is None
        first_token_s = (arrival_s + first_byte_s - started_s
                         if stream and first_byte_s is not None and status == 200 else None)
        finish_s = None if rejected else wall_s
        tokens, source = meter.output_tokens() if meter is not None else (None, "none")
        tokens = tokens or 0
        ttft_slo_s, tpot_slo_s = self.slo_targets_s(slo_class)
        ttft_s = None if first_token_s is None else first_token_s - arrival_s
        tpot_s = (None if first_token_s is None or finish_s is None
                  else (0.0 if tokens <= 1 else (finish_s - first_token_s) / (tokens - 1)))
        record: dict[str, Any] = {
            "request_id": request_id, "tenant": tenant, "slo_class": slo_class, "model": model,
            "pool": instance[1] if instance else "", "instance_id": instance[0] if instance else "",
            "gpu": instance[2] if instance else "", "arrival_s": round(arrival_s, 6),
            # The router sees no dispatch apart from arrival (an admission-queue wait is in the TTFT).
            "dispatch_s": round(arrival_s, 6),
            "first_token_s": None if first_token_s is None else round(first_token_s, 6),
            "finish_s": None if finish_s is None else round(finish_s, 6), "input_tokens": input_tokens,
            "output_tokens": tokens, "cached_prompt_tokens": 0, "preemptions": 0, "rejected": rejected,
            "reject_reason": reject_reason, "ttft_slo_s": _finite(ttft_slo_s), "tpot_slo_s": _finite(tpot_slo_s),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
            "tpot_ms": None if tpot_s is None else round(tpot_s * 1000, 3),
            "e2e_ms": None if finish_s is None else round((finish_s - arrival_s) * 1000, 3),
            "status": status, "stream": stream, "max_tokens": max_tokens, "instance_inflight": inflight,
            "output_tokens_from": source,
        }
        if features is not None:
            record["feature_spec"] = FEATURE_SPEC_VERSION
            record["dense"] = list(features.dense)
            if self.settings.include_prompt_text:
                record["instruction_text"] = features.instruction_text
        if prompt is not None:
            record["prompt"] = prompt
        return record

    def recent(self, since_s: float, max_records: int, max_bytes: int) -> tuple[list[bytes], bool]:
        """Blocking: see `read_recent`; over every file of `read_paths`, merged in arrival order."""
        paths = self.settings.read_paths or (self.settings.path,)
        if len(paths) == 1:
            return read_recent(paths[0], self.settings.keep_files, since_s, max_records, max_bytes)
        merged: list[tuple[float, bytes]] = []
        cut = False
        for path in paths:
            lines, truncated = read_recent(path, self.settings.keep_files, since_s, max_records, max_bytes)
            cut = cut or truncated
            merged.extend((_arrival_s(line) or 0.0, line) for line in lines)
        merged.sort(key=lambda item: item[0])
        kept: deque[bytes] = deque()
        size = 0
        for _, line in merged:  # the limits again, over all files: the newest kept
            kept.append(line)
            size += len(line)
            while len(kept) > max_records or size > max_bytes:
                size -= len(kept.popleft())
                cut = True
        return list(kept), cut

    def close(self) -> None:
        self.writer.close()
