"""The one HTTP/1.1 server of Tokenyard: serves an ASGI app (the router's front door, the
emulated engine) on the running event loop, with every input bounded in size and time.

Why its own server and not uvicorn: measured in one run (bench/http_server.py, numbers in
docs/benchmarks.md "Front-door HTTP server"), the two are within noise of each other on
throughput through the router at concurrency 1, 32 and 128, streaming and not, while
uvicorn (httptools protocol) has no limit on header size or count, no timeout on reading
a request's head or body (only a keep-alive timeout between requests), answers
`Expect: 100-continue` before the app sees the request size, and turns an exception into
a plain-text 500. Those are the hostile cases below; each one is a setting here.

Limits (`Http1Limits`, all per connection unless said):
- request line (`max_url_bytes`, 414) and head (`max_head_bytes` for the request line and
  all headers together, `max_headers` for their count, 431), counted as bytes arrive,
  before the parser buffers them (httptools grows a partial header value by
  concatenation, so an unbounded value costs quadratic time on the event loop);
- `head_timeout_s` from a request's first byte to the end of its head, `body_timeout_s`
  from there to the end of its body (slowloris, a body shorter than its Content-Length):
  408 and close;
- `max_body_bytes` (413 before the body is read: `Expect: 100-continue` is answered only
  after this check, and a chunked body is cut off as soon as it passes the limit);
- `idle_timeout_s` between requests, `write_timeout_s` for a client that stops reading;
- `max_connections` per server (503 and close beyond it), `max_pipelined` requests
  queued per connection (reading pauses beyond it).
HTTP/1.0 clients get no chunked framing: a response of unknown length is delimited by
closing the connection. An exception in the app becomes a 500 in OpenAI's error shape,
logged once; the client never sees a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
import orjson

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
App = Callable[[MutableMapping[str, Any], Receive, Callable[[Message], Awaitable[None]]], Awaitable[None]]

LINGER_S = 1.0
_ASGI = {"version": "3.0", "spec_version": "2.3"}  # the same for every request: built once
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# The status line of every known status, made once: `_response_head` went from ~8,600 to
# ~7,900 instructions per response in the compiled server without the bytes %-format
# (callgrind, docs/benchmarks.md issue 17 stop 24).
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_ERROR_TYPES = {400: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
                414: "invalid_request_error", 431: "invalid_request_error", 500: "internal_error",
                503: "service_unavailable"}


def error_json(status: int, message: str) -> bytes:
    """OpenAI's error shape, as the router and vLLM answer."""
    return orjson.dumps({"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": None,
                                   "code": status}})


@dataclass(frozen=True, slots=True)
class Http1Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_url_bytes: int = 8 * 1024
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    write_timeout_s: float = 60.0
    max_connections: int = 4096
    max_pipelined: int = 4
    body_limit_hint: str = ""  # appended to the 413 message, e.g. which setting sets the limit


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Exchange:
    """One parsed request waiting for, or in, its turn on a connection."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "http_version")

    def __init__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool, http_version: str) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_version = http_version


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Http1Protocol(asyncio.Protocol):
    """One client connection: parse requests (bounded), run the app for each in order.

    One task per connection runs its requests one after another (pipelined requests are
    answered in order); a response head leaves together with its first body bytes, and
    streams are framed as chunked in the same write.
    """

    def __init__(self, app: App, owner: Http1Server) -> None:
        self.app = app
        self.owner = owner
        self.limits = owner.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[_Exchange] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.disconnected: asyncio.Future[None] = self.loop.create_future()
        # Resolved when the client's connection is gone: an app can watch it with a
        # done-callback instead of a task blocked in receive() (router/app.py does).
        # `tokenyard.task` (set when the connection's first request starts) is the task
        # the app runs in, awaited there, never spawned: an app that cancels it need not
        # ask `asyncio.current_task()` per request.
        self.extensions: dict[str, Any] = {"tokenyard.disconnected": self.disconnected}
        self.writable: asyncio.Future[None] | None = None
        # One lazily re-armed timer per connection (see _arm): the current limit is a
        # deadline (loop time) and a callback; the timer handle is not replaced per request.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline_s: float | None = None
        self.on_deadline: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        self.tick_s = max(0.001, min(self.limits.head_timeout_s, self.limits.body_timeout_s,
                                     self.limits.idle_timeout_s))
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.in_head = True  # between a request's first byte (or the connection's start) and its head's end
        self.head_bytes = 0
        self.responding = False  # a response to the current exchange has started
        self.discarding = False  # answered an error: input is read and dropped until the close
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._reject: _Reject | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.client = (str(peer[0]), int(peer[1])) if peer else None
        self.server = (str(sockname[0]), int(sockname[1])) if sockname else None
        if len(self.owner.connections) >= self.limits.max_connections:
            self.owner.refused_connections += 1
            self._write_error(503, f"too many connections (limit {self.limits.max_connections}); retry later")
            return
        self.owner.connections.add(self)
        self._arm(self.limits.idle_timeout_s, self._idle_close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        self._disarm()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.discarding:
            return
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self._reject is not None:
                raise self._reject
            if self.in_head and self.head_bytes > self.limits.max_head_bytes:
                raise _Reject(431, f"request head exceeds {self.limits.max_head_bytes} bytes")
        except _Reject as rejected:
            self._write_error(rejected.status, str(rejected))
        except httptools.HttpParserUpgrade:
            self._write_error(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as parse_error:
            # Its own name: mypyc gives one name one type in a function, and as `exc` (a
            # `_Reject` above) the compiled build raised TypeError on the parser's error.
            cause = self._reject or parse_error.__context__
            if isinstance(cause, _Reject):
                self._write_error(cause.status, str(cause))
            else:
                self._write_error(400, f"malformed HTTP request: {parse_error}")

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._body = []
        self._body_size = 0
        self.in_head = True
        self._arm(self.limits.head_timeout_s, self._timed_out, "request head")

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > self.limits.max_url_bytes:
            self._reject = _Reject(414, f"request target exceeds {self.limits.max_url_bytes} bytes")
            raise self._reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        # A whole head that arrived in one read is measured here; one still arriving is
        # measured in data_received, before the parser has buffered all of it.
        self._head_size += len(name) + len(value) + 4
        if len(self._headers) > self.limits.max_headers:
            self._reject = _Reject(431, f"more than {self.limits.max_headers} request headers")
            raise self._reject
        if self._head_size > self.limits.max_head_bytes:
            self._reject = _Reject(431, f"request head exceeds {self.limits.max_head_bytes} bytes")
            raise self._reject

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        length = expect = None
        for name, value in self._headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value.lower()
        limit = self.limits.max_body_bytes
        if length is not None and length.strip().isdigit() and int(length) > limit:
            # Refused before a byte of it is read (and before any 100 Continue).
            self._reject = _Reject(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes"
                                        f"{self.limits.body_limit_hint}")
            raise self._reject
        self._arm(self.limits.body_timeout_s, self._timed_out, "request body")
        if expect == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_bytes:
            self._reject = _Reject(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes"
                                        f"{self.limits.body_limit_hint}")
            raise self._reject
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_head = True
        self.head_bytes = 0
        path, _, query = self._url.partition(b"?")
        method = self.parser.get_method()
        exchange = _Exchange(_METHODS.get(method) or method.decode("ascii", "replace"), path.decode("latin-1"), query,
                             self._headers, b"".join(self._body), self.parser.should_keep_alive(),
                             self.parser.get_http_version())
        self.pending.append(exchange)
        if len(self.pending) > self.limits.max_pipelined and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining without reading answers
        if self.worker is None:
            self.worker = self.loop.create_task(self._serve())
            self.extensions["tokenyard.task"] = self.worker
        elif self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- timers ----------------------------------------------------------------------------
    def _arm(self, delay_s: float, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` in `delay_s` unless disarmed or re-armed before.

        A request arms three limits in turn (head, body, idle); a call_later + cancel for
        each cost 3 timer handles per request (bench/router_overhead.py, issue #17). Here
        arming only moves the deadline: the one timer fires at most `tick_s` (the shortest
        limit) after it was scheduled, and re-schedules itself for what is left, so a
        deadline later than the scheduled firing needs no new handle.
        """
        now = self.loop.time()
        deadline_s = now + delay_s
        self.deadline_s = deadline_s
        self.on_deadline = (callback, args)
        if self.timer is None or self.timer_at > deadline_s:
            self._schedule(min(deadline_s, now + self.tick_s))

    def _schedule(self, at_s: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at_s
        self.timer = self.loop.call_at(at_s, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        deadline_s = self.deadline_s
        if deadline_s is None or self.on_deadline is None:
            return  # disarmed: the next _arm schedules again
        now = self.loop.time()
        if now >= deadline_s - 0.001:  # the loop may fire up to its clock resolution early
            callback, args = self.on_deadline
            self.deadline_s = self.on_deadline = None
            callback(*args)
            return
        self._schedule(min(deadline_s, now + self.tick_s))

    def _disarm(self) -> None:
        self.deadline_s = None
        self.on_deadline = None

    def _idle_close(self) -> None:
        if not self.pending and self.transport is not None and (self.wakeup is None or not self.wakeup.done()):
            self.transport.close()

    def _timed_out(self, what: str) -> None:
        self.owner.timed_out_requests += 1
        limit_s = self.limits.head_timeout_s if what == "request head" else self.limits.body_timeout_s
        if self.responding:  # an answer is going out on this connection: just end it
            if self.transport is not None:
                self.transport.close()
            return
        self._write_error(408, f"{what} not received within {limit_s:g} s")

    def _write_error(self, status: int, message: str) -> None:
        """Answer `status` and close: the connection's input cannot be trusted any more."""
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.responding:
            transport.close()
            return
        self.pending.clear()  # requests parsed before the bad input are dropped with the connection
        body = error_json(status, message)
        transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                        b"connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b""), len(body), body))
        # Lingering close (as nginx does): closing with unread input would send a reset
        # that can destroy the answer before the client reads it, so the write side is
        # shut, input is discarded, and the connection closes within LINGER_S regardless.
        self.discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        self._arm(LINGER_S, transport.close)

    # -- serving ---------------------------------------------------------------------------
    async def _serve(self) -> None:
        while not self.disconnected.done() and not self.discarding:
            if not self.pending:
                if self.owner.closing:
                    break
                if self.deadline_s is None:
                    self._arm(self.limits.idle_timeout_s, self._idle_close)
                self.wakeup = self.loop.create_future()
                await self.wakeup
                self.wakeup = None
                continue
            exchange = self.pending.popleft()
            if len(self.pending) <= 1 and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            self.responding = True
            # The app is awaited here, not in a helper coroutine: every resume of the
            # request (engine answer, client write) walks each frame of the await chain
            # (py-spy on the router under load, issue #17).
            scope, state, send = self._exchange(exchange)
            try:
                await self.app(scope, state.receive, send)
            except Exception:
                keep_alive = await self._app_failed(exchange, state, send)
            else:
                keep_alive = state.complete and bool(state.keep_alive)
            finally:
                self.responding = False
            if not keep_alive or self.owner.closing:
                break
        if self.transport is not None and not self.transport.is_closing() and not self.discarding:
            self.transport.close()

    async def _app_failed(self, exchange: _Exchange, state: _ExchangeState, send: Callable[[Message], Awaitable[None]]) -> bool:
        """The app raised: a 500 in OpenAI's shape if nothing was sent yet (then the
        connection may go on), else the connection ends (False)."""
        log.exception("request failed in the app", extra={"path": exchange.path[:200]})
        if state.started or self.disconnected.done():
            return False
        body = error_json(500, "internal error")
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return state.complete and bool(state.keep_alive)

    def _exchange(self, exchange: _Exchange) -> tuple[MutableMapping[str, Any], _ExchangeState,
                                                     Callable[[Message], Awaitable[None]]]:
        """The ASGI scope, the state its receive()/send() share, and send() for one request."""
        transport = self.transport
        assert transport is not None
        http10 = exchange.http_version == "1.0"
        scope = {
            "type": "http", "asgi": _ASGI, "http_version": exchange.http_version,
            "method": exchange.method, "scheme": "http", "path": exchange.path,
            "raw_path": exchange.path.encode("latin-1"), "query_string": exchange.query, "root_path": "",
            "headers": exchange.headers, "client": self.client, "server": self.server,
            "extensions": self.extensions,
        }
        state = _ExchangeState(exchange.keep_alive, exchange.body, self.disconnected)
        disconnected = self.disconnected
        write_timeout_s = self.limits.write_timeout_s

        async def send(message: Message) -> None:
            if disconnected.done() or state.complete or self.discarding:
                return
            if message["type"] == "http.response.start":
                state.head, state.chunked, state.keep_alive = _response_head(
                    int(message["status"]), message.get("headers", ()), bool(state.keep_alive), http10)
                state.started = True
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if state.chunked:
                out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out = body
            if state.head:
                out = state.head + out
                state.head = b""
            if out:
                transport.write(out)
            if not more:
                state.complete = True
            elif self.writable is not None and not self.writable.done():
                # The client reads slower than the app writes; one that stops reading is cut off.
                try:
                    await asyncio.wait_for(asyncio.shield(self.writable), write_timeout_s)
                except TimeoutError:
                    transport.abort()

        return scope, state, send


class _ExchangeState:
    """What one exchange's receive()/send() share: how far the response got."""

    __slots__ = ("keep_alive", "started", "complete", "chunked", "head", "body", "disconnected")

    def __init__(self, keep_alive: bool, body: bytes | None, disconnected: asyncio.Future[None]) -> None:
        self.keep_alive = keep_alive
        self.started = False
        self.complete = False
        self.chunked = False
        self.head = b""
        self.body = body  # None once read
        self.disconnected = disconnected

    async def receive(self) -> Message:
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.disconnected.done() and not self.complete:
            await asyncio.shield(self.disconnected)  # shielded: a cancelled waiter must not cancel it
        return {"type": "http.disconnect"}


def _response_head(status: int, headers: Any, keep_alive: bool, http10: bool) -> tuple[bytes, bool, bool]:
    """The response head, whether the body is chunked, and whether the connection stays open."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
    lines = [line]
    has_length = False
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":  # no lower() for the others
            has_length = True
        # Four parts for the one join below, not three concatenations (each a new bytes)
        # per header.
        lines.extend((name, b": ", value, b"\r\n"))
    chunked = False
    if not has_length:
        if http10:  # no chunked framing for HTTP/1.0: the close delimits the body
            keep_alive = False
        else:
            chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    elif http10:
        lines.append(b"connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked, keep_alive


class Http1Server:
    """An ASGI app served on (host, port) of the running loop; `stop()` drains politely."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0, *, limits: Http1Limits | None = None,
                 reuse_port: bool = False, name: str = "http") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.limits = limits or Http1Limits()
        self.reuse_port = reuse_port
        self.name = name
        self.connections: set[Http1Protocol] = set()
        self.closing = False
        self.refused_connections = 0
        self.timed_out_requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            reason = "address in use" if exc.errno == 98 else exc.strerror or str(exc)
            raise OSError(f"{self.name}: cannot listen on {self.host}:{self.port}: {reason}") from None
        except OverflowError:
            sock.close()
            raise OSError(f"{self.name}: cannot listen on {self.host}:{self.port}: port must be 0-65535") from None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Http1Protocol(self.app, self), sock=sock, backlog=4096)
        self.port = int(sock.getsockname()[1])  # the bound socket (uvloop gives `sockets` as a list)

    def client_sockets(self) -> list[socket.socket]:
        found = []
        for protocol in list(self.connections):
            transport = protocol.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                found.append(sock)
        return found

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; idle connections close now, requests in flight get `grace_s`."""
        self.closing = True
        if self._server is None:
            return
        self._server.close()
        for protocol in list(self.connections):
            idle = not protocol.pending and (protocol.worker is None or protocol.wakeup is not None)
            if idle and protocol.transport is not None:
                protocol.transport.close()
        workers = [p.worker for p in list(self.connections) if p.worker is not None and not p.worker.done()]
        if workers:
            _, late = await asyncio.wait(workers, timeout=grace_s)
            for task in late:
                task.cancel()
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.close()
