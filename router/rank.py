"""The router's use of the output-length ranker: `RequestInfo.predicted_rank` for every
request, and the finished-request log that `tokenyard train rank` retrains from. What the
rank decides is the policy document's: `queue.sort: learned_rank` orders the admission
queue and `queue.engine_priority: learned_rank` gives the engines' `priority`, the same in
the router and the simulator (scheduler.rank_queue).

Config (router YAML, all optional; no `rank` section = the ranker is off):

    rank:
      model: path/to/model.json.gz       # default: the ranker shipped in the package

Scoring costs ~0.1-0.5 ms (bench/ranking.py --predictor), more than the ~100 us a request
may hold the event loop, so it runs on one worker thread (`annotate`); the request waits
for it, other requests do not.

The retraining loop (docs/ranking.md): with the request records on (`records:` section,
router/records.py), every finished request, streamed or not, is written with its output
tokens and the ranker's features (`feature_spec`, `dense`; `instruction_text` only with
`records.include_prompt_text`); then

    tokenyard train rank --data ../shared/data --data /var/lib/tokenyard/records.jsonl --out new.json.gz

and point `rank.model` at the new file (a router restart loads it). Lines logged under
another feature spec are refused with a message naming both versions.

`rank.log` / `rank.log_max_bytes` of older configs are an alias of `records: {path,
max_bytes, include_prompt_text: true}` (router/config.py; both at once is an error).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from scheduler.predictors.features import RequestFeatures, request_features
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


class RequestRanker:
    """Scores requests once each (on a worker thread); keeps their features until they
    finish when the request records take them."""

    def __init__(self, settings: RankSettings, model: RankModel | None = None, *, keep_features: bool = False) -> None:
        self.model = model if model is not None else load_rank_model(settings.model_path)
        self.keep_features = keep_features  # the request records want them (router/records.py)
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
        if self.keep_features:
            self._features[info.request_id] = features
            if len(self._features) > _PENDING_MAX:
                self._features.popitem(last=False)
        return dataclasses.replace(info, predicted_rank=rank)

    def take_features(self, request_id: str) -> RequestFeatures | None:
        """The features of a finished request (for its record), forgotten here."""
        return self._features.pop(request_id, None)

    def forget(self, info: RequestInfo) -> None:
        self._features.pop(info.request_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
