"""Structured logging: one JSON object per line on stderr (or plain text for humans).

Use the stdlib logger and pass fields as `extra`:

    log.info("request dispatched", extra={"request_id": rid, "instance": iid})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger once, for a command-line entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs of the ASGI server are ours to write (structured), not uvicorn's.
    logging.getLogger("uvicorn.access").disabled = True


class RateLimitedLog:
    """At most one record per `key` every `interval_s`; the ones held back are counted.

    For warnings that a failing dependency would otherwise repeat once per request (Redis
    down, a denied control-plane caller hammering the port): the first occurrence is
    logged at once, later ones at most once per interval with `suppressed=N`, the number
    held back since the last one. Keys are bounded (`max_keys`, oldest dropped first), so
    a caller-chosen key cannot grow memory.

        redis_down = RateLimitedLog(log, interval_s=10.0)
        redis_down.warning("affinity", "state store unreachable", extra={"error": str(exc)})
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *, max_keys: int = 1024,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._monotonic = monotonic
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last logged at, held back since)

    def log(self, level: int, key: str, msg: str, extra: dict[str, object] | None = None) -> bool:
        """Log unless `key` was logged within the interval; True when it was logged."""
        now_s = self._monotonic()
        last = self._last.get(key)
        if last is not None and now_s - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        fields = dict(extra or {})
        if last is not None and last[1]:
            fields["suppressed"] = last[1]
        self._last.pop(key, None)  # re-inserted last: the dict stays in least-recently-logged order
        self._last[key] = (now_s, 0)
        if len(self._last) > self.max_keys:
            del self._last[next(iter(self._last))]
        self.logger.log(level, msg, extra=fields)
        return True

    def warning(self, key: str, msg: str, extra: dict[str, object] | None = None) -> bool:
        return self.log(logging.WARNING, key, msg, extra)

    def info(self, key: str, msg: str, extra: dict[str, object] | None = None) -> bool:
        return self.log(logging.INFO, key, msg, extra)
