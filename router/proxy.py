"""Forwarding to engines: a keep-alive HTTP/1.1 connection pool on raw asyncio protocols.

Why not httpx (the design's default client) on the hot path: measured on the 2-core box
against a zero-latency engine on loopback (bench/peers/client_compare.py, one process on
uvloop, 32 concurrent non-streaming POSTs, two runs): httpx.AsyncClient 53-57 req/s (its
connection pool collapses under that concurrency here), aiohttp 1,300-1,500 req/s, this
pool 4,700-5,000 req/s. The pool below parses responses with httptools (llhttp, the parser
uvicorn uses), keeps idle connections per engine, sets TCP_NODELAY on every connection (a
kept-alive connection with Nagle on adds tens of ms to the first token), and hands body
chunks to the caller as they arrive, so streams are relayed without buffering. httpx is
still the client where speed does not matter (tests, `tokenyard up` readiness checks).

Only what the router needs: one request at a time per connection (no pipelining),
Content-Length request bodies, responses framed by Content-Length, chunked encoding or
connection close.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

# A connection idle longer than this is dropped rather than reused: uvicorn (vLLM's
# server) closes idle keep-alive connections after 5 s, and reusing one the server is
# closing races with its FIN.
IDLE_REUSE_LIMIT_S = 4.0
# Past this many buffered bytes the pool stops reading from the engine until the
# consumer (a slow client) catches up.
READ_HIGH_WATER_BYTES = 1 << 20


class UpstreamError(Exception):
    """The engine could not be reached or broke the exchange; `kind` says how.

    kind: "connect" (no connection), "timeout" (no response headers or chunk in time),
    "reset" (connection closed mid-exchange), "protocol" (unparseable response).
    `reused` is True when it failed on a kept-alive connection before any response byte,
    the one case where resending to the same engine is safe and expected.
    """

    def __init__(self, kind: str, message: str, reused: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.reused = reused


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamResponse:
    """One response: status and headers, then body chunks in arrival order."""

    __slots__ = ("status", "headers", "_chunks", "_buffered", "_waiter", "_done", "_error",
                 "_conn", "_headers_waiter", "framed", "_got_bytes")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._headers_waiter: asyncio.Future[None] = conn.loop.create_future()
        self._done = False
        self._error: UpstreamError | None = None
        self._conn: _Connection | None = conn
        self.framed = False  # Content-Length or chunked: a close before the end is an error
        self._got_bytes = False

    # -- consumer side -------------------------------------------------------------------
    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        """The next body chunk, or None at the end; raises UpstreamError on failure."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            conn = self._conn
            assert conn is not None  # not done and no error: the connection still carries it
            self._waiter = waiter = conn.loop.create_future()
            if timeout_s is not None:
                conn.expire_at(waiter, conn.loop.time() + timeout_s)
            try:
                await waiter
            except TimeoutError:
                self.abort()
                raise UpstreamError("timeout", f"no body chunk within {timeout_s:.3f} s") from None
            finally:
                self._waiter = None
                conn.expire_done(waiter)
        # Everything that has arrived goes out at once: events that came in one read are
        # relayed in one write (per-event writes cost a syscall each), and nothing waits.
        if len(self._chunks) == 1:
            chunk = self._chunks.popleft()
        else:
            chunk = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered -= len(chunk)
        if self._buffered < READ_HIGH_WATER_BYTES // 2 and self._conn is not None:
            self._conn.resume()
        return chunk

    async def read_all(self, timeout_s: float | None = None) -> bytes:
        parts = []
        while (chunk := await self.next_chunk(timeout_s)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def read_limited(self, max_bytes: int, timeout_s: float) -> bytes:
        """The whole body within `timeout_s` in all (not per chunk: a dripping engine does
        not extend it) and at most `max_bytes`; UpstreamError otherwise (the connection
        is then closed)."""
        until_s = time.monotonic() + timeout_s
        parts = []
        size = 0
        while (chunk := await self.next_chunk(max(0.001, until_s - time.monotonic()))) is not None:
            size += len(chunk)
            if size > max_bytes:
                self.abort()
                raise UpstreamError("protocol", f"response body over {max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    @property
    def ended(self) -> bool:
        """Everything has been read: the next `next_chunk` returns None at once."""
        return self._done and not self._chunks and self._error is None

    def abort(self) -> None:
        """Stop reading and close the connection (the engine then cancels the request)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not self._done and self._error is None:
            self._error = UpstreamError("reset", "response aborted by the router")

    # -- producer side (the connection) --------------------------------------------------
    def _headers_complete(self) -> None:
        if not self._headers_waiter.done():
            self._headers_waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > READ_HIGH_WATER_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._done:
            return
        self._error = error
        self._conn = None
        if not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection to an engine; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.keep_alive = True
        self.reused = False
        self.idle_since_s = 0.0
        self._paused = False
        # One lazily re-armed timer per connection for the waits of its exchanges (response
        # headers, each body chunk): `expire_at` only moves the deadline, and the timer,
        # when it fires before the current deadline, re-schedules itself for it. A
        # call_later + cancel per wait cost a timer handle per request and per streamed
        # chunk (bench/router_overhead.py, issue #17); now a connection busy with requests
        # that each finish within the timeout schedules about one timer per timeout.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_s = 0.0
        self._expiring: asyncio.Future[Any] | None = None
        self._expires_at_s = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"unparseable response from {self.pool.authority}: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None:
            if not response.framed and response.status:
                response._finish()  # body delimited by connection close
            else:
                reused = self.reused and not response._got_bytes
                self._fail(UpstreamError("reset", f"connection to {self.pool.authority} closed mid-response", reused))
            self.response = None

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        for key, value in response.headers:
            size = len(key)
            if size != 14 and size != 17:  # neither name: no lower()
                continue
            lower = key.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                response.framed = True
                break
        response._headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        self.response = None
        if response is not None:
            response._finish()
        if self.keep_alive and not self.closed:
            self.pool._release(self)
        else:
            self.close()

    # -- timeouts --------------------------------------------------------------------------
    def expire_at(self, future: asyncio.Future[Any], at_s: float) -> None:
        """Fail `future` with TimeoutError at loop time `at_s` unless it is done by then
        (one timed wait per connection at a time: the latest call wins)."""
        self._expiring = future
        self._expires_at_s = at_s
        if self._timer is None or self._timer_at_s > at_s:
            self._schedule(at_s)

    def expire_done(self, future: asyncio.Future[Any]) -> None:
        """`future`'s wait is over. Only its own: by the time its waiter resumes, the
        connection may already carry the next exchange, whose wait is timed now."""
        if self._expiring is future:
            self._expiring = None

    def _schedule(self, at_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at_s = at_s
        self._timer = self.loop.call_at(at_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        future = self._expiring
        if future is None or future.done():
            return  # nothing waits: the next expire_at schedules again
        if self.loop.time() >= self._expires_at_s - 0.001:  # a loop may fire up to its resolution early
            self._expiring = None
            future.set_exception(TimeoutError())
            return
        self._schedule(self._expires_at_s)

    # -- helpers ---------------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        response = self.response
        self.response = None
        if response is not None:
            response._fail(error)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(UpstreamError("reset", f"connection to {self.pool.authority} closed"))


class UpstreamPool:
    """Idle keep-alive connections to one engine (host:port), reused LIFO."""

    def __init__(self, url: str, *, connect_timeout_s: float = 2.0, max_idle: int = 512) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"engine url {url!r}: expected http://host:port")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authority = f"{self.host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._host_header = f"Host: {self.authority}\r\n".encode()
        self._request_lines: dict[tuple[str, str], bytes] = {}  # (method, path) -> request line + Host
        self.retired = False  # no longer handed out: busy connections close when done

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamError("connect", f"connect to {self.authority} timed out after {self.connect_timeout_s} s") from None
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to {self.authority}: {exc.strerror or exc}") from None
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if self.retired or len(self._idle) >= self.max_idle:
            conn.close()
            self._all.discard(conn)
            return
        conn.idle_since_s = time.monotonic()
        self._idle.append(conn)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since_s < IDLE_REUSE_LIMIT_S:
                conn.reused = True
                return conn
            conn.close()
            self._all.discard(conn)
        return None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: bytes = b"",
        headers_timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response headers arrived.

        `headers` are extra raw header lines (`Name: value\\r\\n` each). A failure on a
        kept-alive connection before any response byte is retried once on a fresh one.
        """
        start = self._request_lines.get((method, path))
        if start is None:
            if len(self._request_lines) >= 64:  # a few fixed routes in practice; never unbounded
                self._request_lines.clear()
            start = self._request_lines[(method, path)] = (
                f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode() + self._host_header)
        small = len(body) < 65536
        # One formatting op builds what goes out in one write (a small body rides with its head).
        data = b"%s%sContent-Length: %d\r\n\r\n%s" % (start, headers, len(body), body if small else b"")
        for attempt in range(2):
            conn = self._take_idle() if attempt == 0 else None
            if conn is None:
                conn = await self._connect()
                conn.reused = False
            response = UpstreamResponse(conn)
            conn.response = response
            assert conn.transport is not None
            conn.transport.write(data)
            if not small:
                conn.transport.write(body)
            waiter = response._headers_waiter
            try:
                # Awaited here, not in a helper coroutine: one frame less on the resume (#17).
                if waiter.done():
                    waiter.result()
                else:
                    if headers_timeout_s is not None:
                        conn.expire_at(waiter, conn.loop.time() + headers_timeout_s)
                    try:
                        await waiter
                    finally:
                        conn.expire_done(waiter)
            except TimeoutError:
                response.abort()
                raise UpstreamError(
                    "timeout", f"no response headers from {self.authority} within {headers_timeout_s:.3f} s"
                ) from None
            except UpstreamError as exc:
                if exc.reused and attempt == 0:
                    continue
                raise
            except asyncio.CancelledError:
                # The caller gave up (its client left): closing the connection is how the
                # engine learns to cancel the request.
                response.abort()
                raise
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()

    def retire(self) -> None:
        """Close the idle connections now; the busy ones finish their exchange first."""
        self.retired = True
        for conn in self._idle:
            conn.close()
            self._all.discard(conn)
        self._idle.clear()

    def connections(self) -> list[_Connection]:
        """Open connections (for tests checking socket options)."""
        return [conn for conn in self._all if not conn.closed]


class PoolSet:
    """One UpstreamPool per engine URL, created on first use."""

    def __init__(self, *, connect_timeout_s: float = 2.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._pools: dict[str, UpstreamPool] = {}

    def get(self, url: str) -> UpstreamPool:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = UpstreamPool(url, connect_timeout_s=self.connect_timeout_s)
        return pool

    def drop(self, url: str) -> None:
        """Forget an engine: idle connections close, requests in flight finish."""
        pool = self._pools.pop(url, None)
        if pool is not None:
            pool.retire()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def pools(self) -> dict[str, UpstreamPool]:
        return dict(self._pools)

