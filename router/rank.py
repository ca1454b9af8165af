"""The router's use of the output-length ranker: `RequestInfo.predicted_rank` for every
request, and the finished-request log that `tokenyard train rank` retrains from. What the
rank decides is the policy document's: `queue.sort: learned_rank` orders the admission
queue and `queue.engine_priority: learned_rank` gives the engines' `priority`, the same in
the router and the simulator (scheduler.rank_queue).

Config (router YAML, all optional; no `rank` section = the ranker is off):

    rank:
      model: path/to/model.json.gz       # default: the ranker shipped in the package
      log: /var/lib/tokenyard/rank.jsonl  # finished requests (features, output tokens)
      log_max_bytes: 104857600            # then it rotates to <log>.1 (one old file kept)

Scoring costs ~0.1-0.5 ms (bench/ranking.py --predictor), more than the ~100 us a request
may hold the event loop, so it runs on one worker thread (`annotate`); the request waits
for it, other requests do not.

The retraining loop: the router appends one JSON line per finished non-streaming request
(streamed answers are not logged yet: their token count is not read from the stream) to `log`:
`{"feature_spec", "dense", "instruction_text", "model", "output_tokens"}`; then

    tokenyard train rank --data ../shared/data --data /var/lib/tokenyard/rank.jsonl --out new.json.gz

and point `rank.model` at the new file (a router restart loads it). Lines logged under
another feature spec are refused with a message naming both versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.predictors.features import FEATURE_SPEC_VERSION, RequestFeatures, request_features
from scheduler.predictors.rank import RankModel, load_rank_model
from scheduler.types import RequestInfo
from tokenyard.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LOG_MAX_BYTES = 100 * 1024 * 1024
_PENDING_MAX = 10_000  # features of requests in flight, kept until they finish
_RECORD_KEYS = ("prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p")


@dataclass(frozen=True, slots=True)
class RankSettings:
    model_path: str | None = None
    log_path: str | None = None
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES


def parse_rank_section(raw: Any, where: str) -> RankSettings | None:
    """The `rank` section of the router config, checked; None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    if "queue_policy" in raw:
        raise ConfigError(f"{where}.queue_policy", "moved to the policy document: set "
                          "policy.queue.engine_priority (e.g. {learned_rank: {max_wait_s: 30}}), which the "
                          "router and the simulator both apply")
    unknown = sorted(set(raw) - {"model", "log", "log_max_bytes"})
    if unknown:
        raise ConfigError(where, f"unknown key(s) {', '.join(unknown)}; expected model, log, log_max_bytes")
    for key in ("model", "log"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{where}.{key}", f"expected a file path, got {raw[key]!r}")
    max_bytes = raw.get("log_max_bytes", DEFAULT_LOG_MAX_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 4096:
        raise ConfigError(f"{where}.log_max_bytes", f"expected an integer >= 4096, got {max_bytes!r}")
    return RankSettings(raw.get("model"), raw.get("log"), max_bytes)


def completion_tokens(body: bytes) -> int | None:
    """`usage.completion_tokens` of a JSON response body or of one SSE event's data."""
    start = body.find(b'"usage"')
    if start < 0:
        return None
    text = body.strip()
    if text.startswith(b"data:"):
        text = text[5:].strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


class RankLog:
    """Appends finished requests' (features, output tokens) as JSON lines, rotating once
    at `max_bytes`. Writes happen on the ranker's worker thread, never on the event loop."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_LOG_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.written = 0

    def line(self, features: RequestFeatures, model: str, output_tokens: int) -> str:
        return json.dumps({
            "feature_spec": FEATURE_SPEC_VERSION, "dense": list(features.dense),
            "instruction_text": features.instruction_text, "model": model, "output_tokens": output_tokens,
        }, separators=(",", ":")) + "\n"

    def append(self, features: RequestFeatures, model: str, output_tokens: int) -> None:
        data = self.line(features, model, output_tokens).encode()
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size + len(data) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                self.written += 1
            except OSError as exc:  # the log is best effort: serving never fails for it
                log.warning("cannot write the rank log", extra={"path": str(self.path), "error": str(exc)})


class RequestRanker:
    """Scores requests once each (on a worker thread) and logs them when they finish."""

    def __init__(self, settings: RankSettings, model: RankModel | None = None) -> None:
        self.model = model if model is not None else load_rank_model(settings.model_path)
        self.log = RankLog(settings.log_path, settings.log_max_bytes) if settings.log_path else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenyard-rank")
        # request id -> features, for the log; bounded (the oldest go: a request that failed
        # never reports its finish)
        self._features: OrderedDict[str, RequestFeatures] = OrderedDict()

    def score_body(self, body: Mapping[str, Any], input_tokens: int) -> tuple[float, RequestFeatures]:
        record = {k: body[k] for k in _RECORD_KEYS if k in body}
        record["input_tokens"] = input_tokens
        features = request_features(record)
        cap = record.get("max_completion_tokens") or record.get("max_tokens")
        cap_log = math.inf if not isinstance(cap, int) or cap <= 0 else math.log1p(cap)
        return self.model.score_features(features, cap_log), features

    async def annotate(self, info: RequestInfo, body: Mapping[str, Any]) -> RequestInfo:
        """`info` with `predicted_rank` set (unchanged if scoring fails)."""
        loop = asyncio.get_running_loop()
        try:
            rank, features = await loop.run_in_executor(self._executor, self.score_body, body, info.input_tokens)
        except Exception as exc:  # a ranker bug must not fail the request
            log.warning("rank scoring failed", extra={"request_id": info.request_id, "error": str(exc)})
            return info
        if self.log is not None and body.get("stream") is not True:
            self._features[info.request_id] = features
            if len(self._features) > _PENDING_MAX:
                self._features.popitem(last=False)
        return dataclasses.replace(info, predicted_rank=rank)


    def finished(self, info: RequestInfo, response_body: bytes | None) -> None:
        """Log a finished request (its output tokens from the response's `usage`)."""
        features = self._features.pop(info.request_id, None)
        if features is None or self.log is None or response_body is None:
            return
        tokens = completion_tokens(response_body)
        if tokens is not None:
            self._executor.submit(self.log.append, features, info.model, tokens)

    def forget(self, info: RequestInfo) -> None:
        self._features.pop(info.request_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
