"""Trace readers: public LLM-serving traces in, `TraceRequest`s in arrival order out.

Formats (auto-detected from the extension and the header, or named with `fmt`):

| fmt           | what                                                              |
| ------------- | ----------------------------------------------------------------- |
| `azure`       | Azure LLM inference CSV: `TIMESTAMP` (wall clock), `ContextTokens`, `GeneratedTokens` |
| `mooncake`    | Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (512-token prefix blocks) |
| `burstgpt`    | BurstGPT CSV: `Timestamp` (s), `Model`, `Request tokens`, `Response tokens`, `Total tokens`, `Log Type` |
| `servegen`    | ServeGen per-client distributions (a `chunk-<client>-trace.csv` file or their folder): arrivals and lengths are *generated* from them, deterministically from `seed` |
| `plain_csv`   | CSV with a header: `arrival_s, input_tokens, output_tokens[, prefix_hashes, prefix_block_tokens, tenant, slo_class, prompt, session_id, model, request_id, p_small_ok]` |
| `plain_jsonl` | one JSON object per line with the same keys (`prefix_hashes` a list of integers) |

Time: `arrival_s` counts seconds from the trace's origin (the first row's timestamp; for
ServeGen, the start of its day, i.e. timestamp 0 in the files), minus the window start,
divided by `rate_scale` (4 = arrivals 4x faster). `window_s=(start, end)` keeps the rows
with `start <= t < end` on the origin-relative, *unscaled* time axis.

Order: rows must be in non-decreasing timestamp order (all the public traces are). A row
earlier than its predecessor is a bad row (`out_of_order`); pass `sort=True` to read the
whole file into memory and sort it instead.

Bad rows raise `TraceError` (a ValueError) naming the file, the line, the column and what
was expected; with `skip_bad_rows=True` they are skipped and counted by reason in
`Trace.counts.skipped`. BurstGPT rows of failed requests (0 response tokens) are always
skipped and counted as `failed_response`: they never produced output to replay.

Reading streams: one `TraceRequest` at a time, so a million-row trace never sits in memory
as rows (unless `sort=True`). A `Trace` can be iterated several times; each pass re-reads the
file and resets `counts`.
"""

from __future__ import annotations

import ast
import csv
import heapq
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import orjson

from sim.workload import TraceRequest

FORMATS = ("azure", "mooncake", "burstgpt", "servegen", "plain_csv", "plain_jsonl")

# A token count above this is a corrupt cell, not a request: no model's context comes near it
# (the catalog's longest is 131,072), and the simulator charges front-end time per prompt
# token, so a row claiming 10^14 tokens arrived 2 simulated years later and the run sampled
# its timeline every 10 s all the way there (minutes of wall time for one bad cell).
MAX_TRACE_TOKENS = 100_000_000
MOONCAKE_BLOCK_TOKENS = 512  # Mooncake's hash_ids each cover 512 prompt tokens
SERVEGEN_WINDOW_S = 600.0  # ServeGen's trace rows are ten-minute windows

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
_PLAIN_REQUIRED = ("arrival_s", "input_tokens", "output_tokens")
_PLAIN_OPTIONAL = ("request_id", "prefix_hashes", "prefix_block_tokens", "tenant", "slo_class",
                   "prompt", "session_id", "model", "p_small_ok")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
_SERVEGEN_TRACE_RE = re.compile(r"chunk-(\d+)-trace\.csv")


class TraceError(ValueError):
    """A trace file is unreadable or has a bad row: says file, line, column and what was expected."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None,
                 column: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem


class _BadRow(Exception):
    """Raised by a row parser; the reader turns it into a TraceError or a skip."""

    def __init__(self, column: str | None, problem: str, reason: str, always_skip: bool = False) -> None:
        super().__init__(problem)
        self.column = column
        self.problem = problem
        self.reason = reason
        self.always_skip = always_skip  # not malformed, just nothing to replay


@dataclass(slots=True)
class TraceCounts:
    """What one pass over a trace saw. Reading stops early at the window end or the limit,
    so `rows_read` counts the rows read up to there, not the file's length."""

    rows_read: int = 0  # data rows (or generated arrivals) looked at
    requests: int = 0  # requests yielded
    outside_window: int = 0  # rows before the window start (or the first row past its end)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows skipped

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "requests": self.requests,
                "outside_window": self.outside_window, "skipped": dict(self.skipped),
                "skipped_total": self.skipped_total}


@dataclass
class Trace:
    """An iterable of `TraceRequest` in arrival order; see `read_trace`."""

    path: Path
    fmt: str
    rate_scale: float = 1.0
    window_s: tuple[float, float] | None = None
    skip_bad_rows: bool = False
    limit: int | None = None
    sort: bool = False
    seed: int = 0
    clients: tuple[int, ...] | None = None  # ServeGen only
    default_slo_class: str = "default"
    counts: TraceCounts = field(default_factory=TraceCounts)

    def __iter__(self) -> Iterator[TraceRequest]:
        self.counts = TraceCounts()
        return self._pipeline()

    def requests(self) -> list[TraceRequest]:
        """All requests as a list (for small traces, tests, and drivers that need a list)."""
        return list(self)

    # -- the common pipeline: origin, order, window, scaling, limit ---------------------

    def _pipeline(self) -> Iterator[TraceRequest]:
        counts = self.counts
        if self.limit is not None and self.limit <= 0:
            return
        source: Iterable[tuple[int, TraceRequest]] = self._source()
        if self.sort:
            source = sorted(source, key=lambda item: item[1].arrival_s)
        origin: float | None = 0.0 if self.fmt == "servegen" else None
        start_s, end_s = self.window_s if self.window_s is not None else (0.0, math.inf)
        scale = self.rate_scale
        prev_raw = -math.inf
        for line, req in source:
            raw = req.arrival_s
            if raw < prev_raw:
                self._bad(line, _BadRow(
                    None, f"timestamp goes backwards ({raw:.6f} s after {prev_raw:.6f} s); "
                    "expected rows in arrival order (pass sort=True / --sort to sort the trace)",
                    "out_of_order"))
                continue
            prev_raw = raw
            if origin is None:
                origin = raw
            rel_s = raw - origin
            if rel_s < start_s:
                counts.outside_window += 1
                continue
            if rel_s >= end_s:
                counts.outside_window += 1
                break  # rows are in order: nothing later can be inside the window
            req.arrival_s = (rel_s - start_s) / scale
            counts.requests += 1
            yield req
            if self.limit is not None and counts.requests >= self.limit:
                break

    def _bad(self, line: int | None, bad: _BadRow) -> None:
        if not (self.skip_bad_rows or bad.always_skip):
            raise TraceError(self.path, bad.problem, line, bad.column)
        self.counts.skipped[bad.reason] += 1

    def _source(self) -> Iterator[tuple[int, TraceRequest]]:
        """(line number, request with arrival_s = raw seconds on the file's own axis)."""
        if self.fmt == "servegen":
            yield from _servegen_source(self)
            return
        try:
            handle = self.path.open("r", newline="", encoding="utf-8")
        except OSError as exc:
            raise TraceError(self.path, f"cannot read: {exc.strerror or exc}") from exc
        with handle:
            if self.fmt in ("mooncake", "plain_jsonl"):
                yield from self._jsonl_rows(handle)
            else:
                yield from self._csv_rows(handle)

    def _csv_rows(self, handle: IO[str]) -> Iterator[tuple[int, TraceRequest]]:
        reader = csv.reader(handle)
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise TraceError(self.path, f"empty file; expected a CSV header ({_expected_header(self.fmt)})", 1)
        header_line = reader.line_num
        names = [cell.strip() for cell in header]
        parse = _csv_row_parser(self.fmt, names, self.path, header_line, self.default_slo_class)
        counts = self.counts
        index = 0
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            counts.rows_read += 1
            try:
                req = parse(row, index)
            except _BadRow as bad:
                self._bad(reader.line_num, bad)
                continue
            index += 1
            if req is not None:
                yield reader.line_num, req

    def _jsonl_rows(self, handle: IO[str]) -> Iterator[tuple[int, TraceRequest]]:
        parse = _mooncake_row if self.fmt == "mooncake" else _plain_json_row
        counts = self.counts
        index = 0
        saw_line = False
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            saw_line = True
            counts.rows_read += 1
            try:
                try:
                    obj = orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise _BadRow(None, f"invalid JSON ({exc}); expected one JSON object per line",
                                  "bad_json") from None
                if not isinstance(obj, dict):
                    raise _BadRow(None, f"expected a JSON object, got {type(obj).__name__}", "bad_json")
                req = parse(obj, index, self.default_slo_class)
            except _BadRow as bad:
                self._bad(line_no, bad)
                continue
            index += 1
            yield line_no, req
        if not saw_line:
            raise TraceError(self.path, f"empty file; expected JSON lines with keys {_expected_header(self.fmt)}", 1)


def read_trace(
    path: str | Path,
    fmt: str = "auto",
    *,
    rate_scale: float = 1.0,
    window_s: tuple[float, float] | None = None,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    sort: bool = False,
    seed: int = 0,
    clients: Sequence[int] | None = None,
    default_slo_class: str = "default",
) -> Trace:
    """Open a trace for streaming. Checks the arguments and the header now; rows are read
    (and bad rows reported) while iterating.

    `clients` selects ServeGen clients (default: every client in the folder, or the one
    the given `chunk-<client>-trace.csv` names); `seed` makes ServeGen generation
    reproducible. `default_slo_class` is given to rows that carry no `slo_class`.
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(path, "no such file or folder")
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise ValueError(f"rate_scale: expected a positive number, got {rate_scale!r}")
    if window_s is not None:
        start, end = window_s
        if not (0 <= start < end):
            raise ValueError(f"window_s: expected 0 <= start < end seconds, got {window_s!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: expected a non-negative number of requests, got {limit!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise ValueError(f"format: unknown trace format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if fmt == "servegen":
        selected = _servegen_clients(path, clients)
        clients = tuple(selected)
    elif clients is not None:
        raise ValueError("clients: only the servegen format has clients")
    trace = Trace(path=path, fmt=fmt, rate_scale=float(rate_scale), window_s=window_s,
                  skip_bad_rows=skip_bad_rows, limit=limit, sort=sort, seed=seed,
                  clients=tuple(clients) if clients is not None else None,
                  default_slo_class=default_slo_class)
    if fmt != "servegen":
        _check_header(trace)
    return trace


def detect_format(path: str | Path) -> str:
    """The trace format from the file name and its header (or first JSON line)."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("chunk-*-trace.csv")):
            return "servegen"
        raise TraceError(path, "a folder, but not a ServeGen one (expected chunk-<client>-trace.csv files)")
    if _SERVEGEN_TRACE_RE.fullmatch(path.name):
        return "servegen"
    first = _first_nonblank_line(path)
    if first is None:
        raise TraceError(path, "empty file; expected a trace (CSV with a header, or JSON lines)", 1)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson") or first.lstrip().startswith("{"):
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError as exc:
            raise TraceError(path, f"invalid JSON on the first line ({exc}); expected JSON lines", 1) from None
        keys = set(obj) if isinstance(obj, dict) else set()
        if "input_length" in keys:
            return "mooncake"
        if "arrival_s" in keys:
            return "plain_jsonl"
        raise TraceError(path, f"unknown JSON-lines trace (keys {sorted(keys)}); expected Mooncake "
                         f"keys ({', '.join(_MOONCAKE_KEYS)}) or plain keys ({', '.join(_PLAIN_REQUIRED)})", 1)
    names = {cell.strip() for cell in next(csv.reader([first]))}
    if set(_AZURE_COLUMNS) <= names:
        return "azure"
    if "Request tokens" in names:
        return "burstgpt"
    if "arrival_s" in names:
        return "plain_csv"
    raise TraceError(path, f"unknown CSV trace (header {sorted(names)}); expected an Azure header "
                     f"({', '.join(_AZURE_COLUMNS)}), a BurstGPT header ({', '.join(_BURSTGPT_COLUMNS)}, ...) "
                     f"or a plain header ({', '.join(_PLAIN_REQUIRED)}, ...)", 1)


# -- row parsers ------------------------------------------------------------------------


def _first_nonblank_line(path: Path) -> str | None:
    try:
        with path.open("r", encoding="utf-8") as handle:
            for text in handle:
                if text.strip():
                    return text
    except OSError as exc:
        raise TraceError(path, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(path, f"not UTF-8 text ({exc.reason}); expected a CSV or JSON-lines trace") from exc
    return None


def _expected_header(fmt: str) -> str:
    return {
        "azure": ", ".join(_AZURE_COLUMNS),
        "burstgpt": "Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type",
        "mooncake": ", ".join(_MOONCAKE_KEYS) + ", hash_ids",
    }.get(fmt, ", ".join(_PLAIN_REQUIRED) + "[, " + ", ".join(_PLAIN_OPTIONAL) + "]")


def _check_header(trace: Trace) -> None:
    """Fail at open time on a missing file, an empty file or a CSV header without the columns."""
    first = _first_nonblank_line(trace.path)
    if first is None:
        raise TraceError(trace.path, f"empty file; expected a trace with {_expected_header(trace.fmt)}", 1)
    if trace.fmt in ("azure", "burstgpt", "plain_csv"):
        names = [cell.strip() for cell in next(csv.reader([first]))]
        _csv_row_parser(trace.fmt, names, trace.path, 1, trace.default_slo_class)


def _column_index(names: list[str], wanted: Sequence[str], path: Path, line: int, fmt: str) -> list[int]:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise TraceError(path, f"header lacks column(s) {', '.join(missing)}; expected a {fmt} header: "
                         f"{_expected_header(fmt)} (got {', '.join(names)})", line)
    return [names.index(name) for name in wanted]


def _cell(row: list[str], index: int, column: str) -> str:
    if index >= len(row):
        raise _BadRow(column, f"row has {len(row)} field(s), expected a value in column {column!r}",
                      "missing_value")
    return row[index]


def _tokens(text: Any, column: str, allow_zero: bool = False) -> int:
    """A token count: a non-negative integer (positive unless `allow_zero`)."""
    if type(text) is str:  # CSV cells: the usual case first
        try:
            value = int(text)  # surrounding whitespace is allowed, as with int(text.strip())
        except ValueError:
            raise _BadRow(column, f"expected an integer token count, got {text!r}", "bad_number") from None
    elif isinstance(text, bool):
        raise _BadRow(column, f"expected an integer token count, got {text!r}", "bad_number")
    elif isinstance(text, int):
        value = text
    elif isinstance(text, float) and text.is_integer():
        value = int(text)
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise _BadRow(column, f"expected an integer token count, got {text!r}", "bad_number") from None
    if value < 0:
        raise _BadRow(column, f"expected a non-negative token count, got {value}", "negative_tokens")
    if value == 0 and not allow_zero:
        raise _BadRow(column, "expected at least 1 token, got 0", "zero_tokens")
    if value > MAX_TRACE_TOKENS:
        raise _BadRow(column, f"expected a token count <= {MAX_TRACE_TOKENS:,} (no model's context is longer), "
                              f"got {value:,}", "too_many_tokens")
    return value


def _seconds(text: Any, column: str) -> float:
    if isinstance(text, bool):
        raise _BadRow(column, f"expected a number of seconds, got {text!r}", "bad_number")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _BadRow(column, f"expected a number of seconds, got {text!r}", "bad_number") from None
    if not math.isfinite(value) or value < 0:
        raise _BadRow(column, f"expected a finite, non-negative time, got {text!r}", "bad_number")
    return value


_DAY_START_S: dict[str, float] = {}
_MINUTE_START_S: dict[str, float] = {}  # "2023-11-16 18:17" -> seconds, as _wall_clock_s sums them
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()  # small numbers keep sub-microsecond precision


def _wall_clock_s(text: str, column: str) -> float:
    """`2023-11-16 18:17:03.9799600` (7 fractional digits; also ISO `T`) -> seconds since
    1970-01-01 as if it were UTC: only differences matter."""
    key = _minute_key(text)
    if key is not None and text[-1] != " ":
        # Rows of one minute share everything up to the seconds: look that part up once.
        minute_s = _MINUTE_START_S.get(key)
        if minute_s is not None:
            try:
                seconds = float(text[17:])
            except ValueError:
                seconds = -1.0
            if 0 <= seconds < 61:
                return minute_s + seconds
    minute_s, seconds = _wall_clock_parts(text, column)
    return minute_s + seconds


def _wall_clock_parts(text: str, column: str) -> tuple[float, float]:
    """(seconds at the start of the minute, seconds into it) of a wall-clock time."""
    text = text.strip()
    try:
        day, clock = text.replace("T", " ").split(" ", 1)
        day_s = _DAY_START_S.get(day)
        if day_s is None:
            day_s = float((date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * 86400)
            _DAY_START_S[day] = day_s
        hours, minutes, seconds = clock.split(":")
        h, m, s = int(hours), int(minutes), float(seconds)
        if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
            raise ValueError
    except ValueError:
        raise _BadRow(column, f"expected a wall-clock time like 2023-11-16 18:17:03.9799600, got {text!r}",
                      "bad_timestamp") from None
    minute_s = day_s + h * 3600 + m * 60
    key = _minute_key(text)
    if key is not None and len(_MINUTE_START_S) < 100_000:
        _MINUTE_START_S[key] = minute_s
    return minute_s, s


def _minute_key(text: str) -> str | None:
    """`2023-11-16 18:17` of `2023-11-16 18:17:03.97...`; None if the text is not laid out so."""
    if len(text) > 17 and text[16] == ":" and text[10] == " ":
        return text[:16]
    return None


RowParser = Callable[[list[str], int], TraceRequest | None]


def _csv_row_parser(fmt: str, names: list[str], path: Path, line: int, slo_class: str) -> RowParser:
    if fmt == "azure":
        i_ts, i_in, i_out = _column_index(names, _AZURE_COLUMNS, path, line, fmt)

        widest = max(i_ts, i_in, i_out)

        def azure(row: list[str], index: int) -> TraceRequest:
            if len(row) > widest:  # every cell is there: no _cell checks needed
                return TraceRequest(f"azure-{index}", _wall_clock_s(row[i_ts], "TIMESTAMP"),
                                    _tokens(row[i_in], "ContextTokens"), _tokens(row[i_out], "GeneratedTokens"),
                                    slo_class=slo_class)
            arrival = _wall_clock_s(_cell(row, i_ts, "TIMESTAMP"), "TIMESTAMP")
            return TraceRequest(
                request_id=f"azure-{index}", arrival_s=arrival,
                input_tokens=_tokens(_cell(row, i_in, "ContextTokens"), "ContextTokens"),
                output_tokens=_tokens(_cell(row, i_out, "GeneratedTokens"), "GeneratedTokens"),
                slo_class=slo_class)

        return azure
    if fmt == "burstgpt":
        i_ts, i_in, i_out = _column_index(names, _BURSTGPT_COLUMNS, path, line, fmt)

        def burstgpt(row: list[str], index: int) -> TraceRequest | None:
            arrival = _seconds(_cell(row, i_ts, "Timestamp"), "Timestamp")
            input_tokens = _tokens(_cell(row, i_in, "Request tokens"), "Request tokens")
            output_tokens = _tokens(_cell(row, i_out, "Response tokens"), "Response tokens", allow_zero=True)
            if output_tokens == 0:
                # a failed request: nothing was generated, so there is nothing to replay
                raise _BadRow("Response tokens", "failed request (0 response tokens)", "failed_response",
                              always_skip=True)
            return TraceRequest(request_id=f"burstgpt-{index}", arrival_s=arrival,
                                input_tokens=input_tokens, output_tokens=output_tokens,
                                slo_class=slo_class)

        return burstgpt
    if fmt == "plain_csv":
        required = _column_index(names, _PLAIN_REQUIRED, path, line, fmt)
        optional = {name: names.index(name) for name in _PLAIN_OPTIONAL if name in names}

        def plain(row: list[str], index: int) -> TraceRequest:
            values: dict[str, Any] = {name: _cell(row, i, name) for name, i in zip(_PLAIN_REQUIRED, required, strict=True)}
            for name, i in optional.items():
                if i < len(row) and row[i] != "":
                    values[name] = row[i]
            return _plain_request(values, index, slo_class)

        return plain
    raise ValueError(f"not a CSV trace format: {fmt!r}")


def _require_keys(row: dict[str, Any], wanted: Sequence[str]) -> None:
    for key in wanted:
        if key not in row or row[key] is None:
            raise _BadRow(key, f"missing key {key!r}", "missing_value")


def _mooncake_row(obj: dict[str, Any], index: int, slo_class: str) -> TraceRequest:
    _require_keys(obj, _MOONCAKE_KEYS)
    hashes = obj.get("hash_ids")
    if hashes is None:
        hashes = []
    if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
        raise _BadRow("hash_ids", f"expected a list of integers, got {hashes!r}", "bad_prefix_hashes")
    return TraceRequest(
        request_id=f"mooncake-{index}",
        arrival_s=_seconds(obj["timestamp"], "timestamp") / 1000.0,
        input_tokens=_tokens(obj["input_length"], "input_length"),
        output_tokens=_tokens(obj["output_length"], "output_length"),
        prefix_hashes=tuple(hashes), prefix_block_tokens=MOONCAKE_BLOCK_TOKENS, slo_class=slo_class)


def _plain_json_row(obj: dict[str, Any], index: int, slo_class: str) -> TraceRequest:
    _require_keys(obj, _PLAIN_REQUIRED)
    return _plain_request(obj, index, slo_class)


def _prefix_hashes(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        items: Sequence[Any] = value
    else:
        text = str(value).strip().strip("[]")
        items = [part for part in re.split(r"[\s;,]+", text) if part]
    try:
        return tuple(int(item) for item in items if not isinstance(item, bool))
    except (TypeError, ValueError):
        raise _BadRow("prefix_hashes", f"expected integers separated by spaces or ';' (or a JSON list), "
                      f"got {value!r}", "bad_prefix_hashes") from None


def _optional_str(values: dict[str, Any], key: str) -> str | None:
    value = values.get(key)
    return None if value is None or value == "" else str(value)


def _optional_share(values: dict[str, Any], key: str) -> float | None:
    """A score in [0, 1] (the tier predictor's p_small_ok), or None when the cell is empty."""
    text = values.get(key)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _BadRow(key, f"expected a number in [0, 1], got {text!r}", "bad_number") from None
    if not 0.0 <= value <= 1.0:
        raise _BadRow(key, f"expected a number in [0, 1], got {text!r}", "bad_number")
    return value


def _plain_request(values: dict[str, Any], index: int, slo_class: str) -> TraceRequest:
    block_tokens = 16
    if values.get("prefix_block_tokens") not in (None, ""):
        block_tokens = _tokens(values["prefix_block_tokens"], "prefix_block_tokens")
    hashes = _prefix_hashes(values["prefix_hashes"]) if values.get("prefix_hashes") not in (None, "") else ()
    return TraceRequest(
        request_id=_optional_str(values, "request_id") or f"req-{index}",
        arrival_s=_seconds(values["arrival_s"], "arrival_s"),
        input_tokens=_tokens(values["input_tokens"], "input_tokens"),
        output_tokens=_tokens(values["output_tokens"], "output_tokens"),
        prefix_hashes=hashes,
        prefix_block_tokens=block_tokens,
        tenant=_optional_str(values, "tenant") or "default",
        slo_class=_optional_str(values, "slo_class") or slo_class,
        model=_optional_str(values, "model"),
        session_id=_optional_str(values, "session_id"),
        prompt=_optional_str(values, "prompt"),
        p_small_ok=_optional_share(values, "p_small_ok"),
    )


# -- ServeGen: generated arrivals -------------------------------------------------------


def _servegen_clients(path: Path, clients: Sequence[int] | None) -> list[int]:
    folder = path if path.is_dir() else path.parent
    available = sorted(int(m.group(1)) for p in folder.glob("chunk-*-trace.csv")
                       if (m := _SERVEGEN_TRACE_RE.fullmatch(p.name)))
    if not available:
        raise TraceError(folder, "no ServeGen chunk-<client>-trace.csv files here")
    if clients is None:
        if path.is_dir():
            return available
        match = _SERVEGEN_TRACE_RE.fullmatch(path.name)
        if match is None:
            raise TraceError(path, "expected a ServeGen chunk-<client>-trace.csv file or its folder")
        return [int(match.group(1))]
    unknown = sorted(set(clients) - set(available))
    if unknown:
        raise TraceError(folder, f"unknown ServeGen client(s) {unknown}; available: "
                         f"{available[0]}..{available[-1]} ({len(available)} clients)")
    return sorted(set(clients))


@dataclass(slots=True)
class _ServeGenWindow:
    start_s: float
    rate_rps: float
    pattern: str  # "Gamma", "Weibull" or "" (no traffic)
    shape: float
    scale: float


def _servegen_windows(path: Path) -> list[tuple[int, _ServeGenWindow]]:
    windows: list[tuple[int, _ServeGenWindow]] = []
    try:
        handle = path.open("r", newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(path, f"cannot read: {exc.strerror or exc}") from exc
    with handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            if len(row) != 6:
                raise TraceError(path, f"expected 6 fields (timestamp_s, rate_rps, cv, pattern, shape, "
                                 f"scale), got {len(row)}", line_no)
            names = ("timestamp_s", "rate_rps", "cv", "pattern", "shape", "scale")
            try:
                start, rate, _cv = (float(row[0]), float(row[1]), float(row[2]))
            except ValueError:
                raise TraceError(path, f"expected numbers in timestamp_s, rate_rps, cv; got {row[:3]}",
                                 line_no, names[0]) from None
            pattern = row[3].strip()
            if pattern not in ("", "Gamma", "Weibull"):
                raise TraceError(path, f"expected pattern Gamma or Weibull (or empty), got {pattern!r}",
                                 line_no, "pattern")
            try:
                shape, scale = float(row[4] or 0), float(row[5] or 0)
            except ValueError:
                raise TraceError(path, f"expected numbers in shape, scale; got {row[4:]}", line_no, "shape") from None
            if rate < 0 or (pattern and rate > 0 and (shape <= 0 or scale <= 0)):
                raise TraceError(path, f"expected rate >= 0 and positive shape and scale, got {row}", line_no)
            windows.append((line_no, _ServeGenWindow(start, rate, pattern, shape, scale)))
    return windows


class _LengthPdfs:
    """A client's input/output token-length PDFs, per 6-hour dataset window, parsed lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: dict[float, dict[str, str]] | None = None
        self._cdfs: dict[tuple[float, str], tuple[Any, Any]] = {}

    def _load(self) -> dict[float, dict[str, str]]:
        if self._raw is None:
            try:
                doc = orjson.loads(self.path.read_bytes())
            except OSError as exc:
                raise TraceError(self.path, f"cannot read: {exc.strerror or exc}") from exc
            except orjson.JSONDecodeError as exc:
                raise TraceError(self.path, f"invalid JSON ({exc}); expected ServeGen's dataset file") from None
            if not isinstance(doc, dict):
                raise TraceError(self.path, "expected a JSON object of window start -> PDFs")
            raw: dict[float, dict[str, str]] = {}
            for key, body in doc.items():
                if isinstance(body, dict) and body.get("input_tokens", "{}").strip() not in ("{}", ""):
                    raw[float(key)] = body
            self._raw = raw
        return self._raw

    def sampler(self, window_start_s: float, column: str) -> tuple[Any, Any]:
        """(values, cumulative probabilities) of the dataset window covering `window_start_s`:
        the latest one starting at or before it, else the earliest (windows without data fall
        back to the nearest that has some)."""
        import numpy as np

        raw = self._load()
        if not raw:
            raise TraceError(self.path, "no non-empty input_tokens/output_tokens PDFs; cannot generate lengths")
        starts = sorted(raw)
        chosen = starts[0]
        for start in starts:
            if start <= window_start_s:
                chosen = start
        key = (chosen, column)
        cached = self._cdfs.get(key)
        if cached is None:
            text = raw[chosen].get(column)
            try:
                pdf = ast.literal_eval(text) if isinstance(text, str) else None
            except (ValueError, SyntaxError):
                pdf = None
            if not isinstance(pdf, dict) or not pdf:
                raise TraceError(self.path, f"window {chosen:g}: column {column!r}: expected a Python dict "
                                 "string of token length -> probability")
            items = sorted((int(k), float(v)) for k, v in pdf.items() if float(v) > 0)
            values = np.array([max(1, k) for k, _ in items], dtype=np.int64)
            cdf = np.cumsum([v for _, v in items])
            cached = (values, cdf / cdf[-1])
            self._cdfs[key] = cached
        return cached


def _weibull_mean(shape: float, scale: float) -> float:
    return scale * math.gamma(1.0 + 1.0 / shape)


def _servegen_client(trace: Trace, client: int, folder: Path) -> Iterator[tuple[int, TraceRequest]]:
    """One client's arrivals in time order. Each ten-minute window draws inter-arrival
    times from its Gamma/Weibull (shape, scale), rescaled so their mean is 1/rate_rps:
    ServeGen's fitted shape carries the burstiness, `rate_rps` the load."""
    import numpy as np

    trace_path = folder / f"chunk-{client}-trace.csv"
    pdfs = _LengthPdfs(folder / f"chunk-{client}-dataset.json")
    rng = np.random.default_rng([trace.seed, client])
    start_limit, end_limit = trace.window_s if trace.window_s is not None else (0.0, math.inf)
    counter = 0
    for line_no, win in _servegen_windows(trace_path):
        if win.rate_rps <= 0 or not win.pattern:
            continue
        if win.start_s + SERVEGEN_WINDOW_S <= start_limit:
            continue
        if win.start_s >= end_limit:
            break
        expected = win.rate_rps * SERVEGEN_WINDOW_S
        draw = max(16, int(expected * 1.3) + 16)
        if win.pattern == "Gamma":
            mean = win.shape * win.scale
            gaps = rng.gamma(win.shape, win.scale, draw)
        else:
            mean = _weibull_mean(win.shape, win.scale)
            gaps = win.scale * rng.weibull(win.shape, draw)
        times = np.cumsum(gaps * ((1.0 / win.rate_rps) / mean))
        while times[-1] < SERVEGEN_WINDOW_S:
            more = (rng.gamma(win.shape, win.scale, draw) if win.pattern == "Gamma"
                    else win.scale * rng.weibull(win.shape, draw))
            times = np.concatenate([times, times[-1] + np.cumsum(more * ((1.0 / win.rate_rps) / mean))])
        times = times[times < SERVEGEN_WINDOW_S]
        if times.size == 0:
            continue
        in_values, in_cdf = pdfs.sampler(win.start_s, "input_tokens")
        out_values, out_cdf = pdfs.sampler(win.start_s, "output_tokens")
        inputs = in_values[np.minimum(np.searchsorted(in_cdf, rng.random(times.size), side="right"),
                                      in_values.size - 1)]
        outputs = out_values[np.minimum(np.searchsorted(out_cdf, rng.random(times.size), side="right"),
                                        out_values.size - 1)]
        tenant = f"client{client}"
        for t, n_in, n_out in zip((win.start_s + times).tolist(), inputs.tolist(), outputs.tolist(), strict=True):
            trace.counts.rows_read += 1
            yield line_no, TraceRequest(request_id=f"servegen-{client}-{counter}", arrival_s=t,
                                        input_tokens=n_in, output_tokens=n_out, tenant=tenant,
                                        slo_class=trace.default_slo_class)
            counter += 1


def _servegen_source(trace: Trace) -> Iterator[tuple[int, TraceRequest]]:
    folder = trace.path if trace.path.is_dir() else trace.path.parent
    streams = [_servegen_client(trace, client, folder) for client in trace.clients or ()]
    # heapq.merge is stable, and ties are broken by client order: deterministic
    yield from heapq.merge(*streams, key=lambda item: item[1].arrival_s)
