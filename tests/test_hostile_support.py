"""Helpers for the hostile-input, fault and security suites (no tests here).

- `ScriptedEngine`: a raw asyncio HTTP server on loopback whose answer to each request is
  a coroutine the test sets (`behaviour`): it may drip, stall, send garbage or a huge
  body, or never answer. It records what it was sent and whether the router hung up.
- `LoopThread`: an event loop in a background thread, so that hypothesis (synchronous)
  can talk to a router served in it over plain sockets.
- `exchange(port, data)`: send raw bytes, read the answer until the server closes or
  goes quiet; `status_of(reply)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from router.state import InstanceRecord

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


def ok_json(body: bytes = b'{"id":"x","object":"text_completion","choices":[{"text":"hi"}]}') -> Behaviour:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    return answer


class ScriptedEngine:
    """An HTTP/1.1 'engine' on loopback; `behaviour` answers each request (keep-alive)."""

    def __init__(self, behaviour: Behaviour | None = None, model: str = "llama-3-8b") -> None:
        self.behaviour = behaviour or ok_json()
        self.model = model
        self.requests: list[bytes] = []
        self.hangups = 0  # connections the peer (the router) closed while we were answering
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, instance_id: str = "e0", **fields: Any) -> InstanceRecord:
        return InstanceRecord(instance_id, self.url, self.model, **fields)

    async def start(self) -> ScriptedEngine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                try:
                    await self.behaviour(reader, writer, head + body)
                except (ConnectionError, OSError):
                    self.hangups += 1
                    return
                if reader.at_eof():
                    self.hangups += 1
                    return
        finally:
            self.open_connections -= 1
            writer.close()

    async def __aenter__(self) -> ScriptedEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def wait_hangup(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """True when the peer closes the connection within `timeout_s` (what a stalled
    engine sees when the router gives up on it)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def exchange(port: int, data: bytes, *, quiet_s: float = 1.0, total_s: float = 10.0,
             half_close: bool = False) -> bytes:
    """Send `data`; read until the server closes, or sends nothing for `quiet_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=total_s) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        sock.settimeout(quiet_s)
        reply = b""
        deadline = time.monotonic() + total_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        return reply


def status_of(reply: bytes) -> int | None:
    """The final status code of the first response (interim 100 skipped), or None."""
    while reply.startswith(b"HTTP/1.1 100"):
        reply = reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""
    if not reply.startswith(b"HTTP/1."):
        return None
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def post(path: str, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/" + version + b"\r\nHost: r\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
