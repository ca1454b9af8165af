"""The front door's HTTP/1.1 server: `FrontDoorProtocol` (the built-in server, the default)
or uvicorn, serving the router's ASGI app (`router.app.Router`) on the running event loop
(`RouterServer`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.errors import error_body
from router.proxy import set_nodelay

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


class CoalescingTransport:
    """Writes made in one event-loop iteration leave in one send() at the end of it.

    uvicorn writes a response's head and its body separately; on loopback every TCP send
    runs the receiver's whole TCP path in the sender's CPU time, so halving the sends is
    ~10% more requests/s on the 2-core box. Unlike Nagle this never waits for an ACK or
    a timer: the flush is the next callback of the same loop iteration.
    """

    __slots__ = ("_transport", "_pending", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._pending: list[bytes] | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class NoDelayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with TCP_NODELAY set on every accepted client socket
    (an SSE chunk must not wait for the previous one's ACK on a kept-alive connection),
    and writes coalesced per loop iteration (CoalescingTransport)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]


class _OwnedSignalsServer(uvicorn.Server):
    """A uvicorn server whose signals are its owner's (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _Exchange:
    """One parsed request waiting for, or in, its turn on a connection."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class FrontDoorProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server for one ASGI app: the router's default front door.

    Why not uvicorn: measured on the 2-core box with a do-nothing ASGI app (loopback, 32
    kept-alive connections, two runs, same load generator), uvicorn (httptools, uvloop)
    answered 5,700-6,500 req/s and this server 8,600-13,700 req/s: uvicorn creates a task
    and a cycle object per request, validates every header with regexes and writes a
    response head and body separately. This server runs the same ASGI app with one task per
    connection (requests on it run in order), writes a head together with the first body
    bytes, and frames streams as chunked in the same write. End to end the router's own
    work and the engine connection dominate, so the two are within noise of each other in
    bench/router_overhead.py (`tokenyard` vs `tokenyard-uvicorn`, both measured in every
    run); uvicorn stays selectable (`--http-server uvicorn`). Keep-alive with an idle
    timeout, pipelining (in order), `Expect: 100-continue`, write flow control and client
    disconnects are handled;
    WebSocket upgrades are refused.
    """

    def __init__(self, app: Any, owner: RouterServer, max_body_bytes: int, idle_timeout_s: float = 30.0) -> None:
        self.app = app
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[_Exchange] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.disconnected: asyncio.Future[None] = self.loop.create_future()
        self.writable: asyncio.Future[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.client = (str(peer[0]), int(peer[1])) if peer else None
        self.server = (str(sockname[0]), int(sockname[1])) if sockname else None
        self.owner.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.worker is None or self.worker.done():
            return
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")

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
        self._body = []
        self._body_size = 0
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        # Past the limit the rest is dropped; the app sees limit + 1 bytes and answers 413.
        if self._body_size <= self.max_body_bytes:
            self._body.append(body[: self.max_body_bytes + 1 - self._body_size])
        self._body_size += len(body)

    def on_message_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        exchange = _Exchange(self.parser.get_method().decode("ascii"), path.decode("latin-1"), query,
                             self._headers, b"".join(self._body), self.parser.should_keep_alive())
        self.pending.append(exchange)
        if len(self.pending) > 16 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining without reading answers
        if self.worker is None:
            self.worker = self.loop.create_task(self._serve())
        elif self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- serving ---------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle_close)

    def _idle_close(self) -> None:
        if not self.pending and self.transport is not None and (self.wakeup is None or not self.wakeup.done()):
            self.transport.close()

    def _reject(self, status: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = error_body(status, message)
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b""), len(body), body))
            self.transport.close()

    async def _serve(self) -> None:
        while not self.disconnected.done():
            if not self.pending:
                if self.owner.closing:
                    break
                self._arm_idle()
                self.wakeup = self.loop.create_future()
                await self.wakeup
                self.wakeup = None
                continue
            exchange = self.pending.popleft()
            if len(self.pending) <= 4 and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            keep_alive = await self._run(exchange)
            if not keep_alive or self.owner.closing:
                break
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _run(self, exchange: _Exchange) -> bool:
        """Run the app for one request; True when the connection can take the next one."""
        transport = self.transport
        assert transport is not None
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": exchange.method, "scheme": "http", "path": exchange.path,
            "raw_path": exchange.path.encode("latin-1"), "query_string": exchange.query, "root_path": "",
            "headers": exchange.headers, "client": self.client, "server": self.server,
        }
        state = {"started": False, "complete": False, "chunked": False, "head": b"", "body_read": False,
                 "keep_alive": exchange.keep_alive}
        disconnected = self.disconnected

        async def receive() -> Message:
            if not state["body_read"]:
                state["body_read"] = True
                return {"type": "http.request", "body": exchange.body, "more_body": False}
            if not disconnected.done() and not state["complete"]:
                await asyncio.shield(disconnected)  # shielded: a cancelled waiter must not cancel it
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if disconnected.done() or state["complete"]:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
                has_length = False
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-length":
                        has_length = True
                    lines.append(name + b": " + value + b"\r\n")
                if not has_length:
                    state["chunked"] = True
                    lines.append(b"transfer-encoding: chunked\r\n")
                if not state["keep_alive"]:
                    lines.append(b"connection: close\r\n")
                lines.append(b"\r\n")
                state["head"] = b"".join(lines)
                state["started"] = True
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if state["chunked"]:
                out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out = body
            if state["head"]:
                out = state["head"] + out
                state["head"] = b""
            if out:
                transport.write(out)
            if not more:
                state["complete"] = True
            elif self.writable is not None and not self.writable.done():
                await self.writable  # the client reads slower than the engine writes

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("request failed in the router", extra={"path": exchange.path})
            if not state["started"] and not disconnected.done():
                body = error_body(500, "internal error in the router")
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                return False
        if not state["complete"]:
            return False  # the app ended without finishing its response
        return bool(state["keep_alive"])


class RouterServer:
    """The router served over HTTP on the running event loop (CLI, `tokenyard up`, tests).

    `http_server`: "builtin" (FrontDoorProtocol, the default) or "uvicorn".
    """

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0, http_server: str = "builtin",
                 reuse_port: bool = False) -> None:
        if http_server not in ("builtin", "uvicorn"):
            raise ValueError(f"http_server: expected builtin or uvicorn, got {http_server!r}")
        self.router = router
        self.host = host
        self.port = port
        self.http_server = http_server
        self.reuse_port = reuse_port  # several worker processes share the port (SO_REUSEPORT)
        self.connections: set[FrontDoorProtocol] = set()
        self.closing = False
        self._server: _OwnedSignalsServer | None = None
        self._builtin: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_sockets(self) -> list[socket.socket]:
        """Accepted client sockets (for tests of socket options)."""
        protocols: list[Any] = list(self.connections)
        if self._server is not None:
            protocols = list(self._server.server_state.connections)
        found = []
        for protocol in protocols:
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                found.append(sock)
        return found

    async def start(self) -> None:
        if not self.router.started:
            await self.router.start()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"router: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        if self.http_server == "builtin":
            limit = self.router.config.max_request_bytes
            self._builtin = await asyncio.get_running_loop().create_server(
                lambda: FrontDoorProtocol(self.router, self, limit), sock=sock, backlog=4096)
            self.port = int(self._builtin.sockets[0].getsockname()[1])
        else:
            config = uvicorn.Config(self.router, host=self.host, port=self.port, loop="none", http=NoDelayProtocol,
                                    ws="none", lifespan="off", access_log=False, log_config=None,
                                    server_header=False, date_header=False, backlog=4096, timeout_keep_alive=30,
                                    proxy_headers=False)
            self._server = _OwnedSignalsServer(config)
            self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="router-http")
            while not self._server.started:
                if self._task.done():
                    raise OSError(f"router: could not start on {self.host}:{self.port}")
                await asyncio.sleep(0.005)
            self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        log.info("router listening", extra={"url": self.url, "http_server": self.http_server})

    async def stop(self, grace_s: float = 5.0) -> None:
        self.closing = True
        if self._builtin is not None:
            self._builtin.close()
            for protocol in list(self.connections):  # idle keep-alive connections go now
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
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.router.stop()
