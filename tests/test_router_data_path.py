"""The data path's per-request work (issue #17): the HTTP server's one lazily re-armed
timer per connection, and the `tokenyard.disconnected` scope extension the router watches
instead of a task per request. Real server on loopback, real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tokenyard.asgi_server import Http1Limits, Http1Server

REQUEST = b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\nhi"


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def test_kept_alive_requests_reuse_one_timer_handle() -> None:
    server = Http1Server(ok_app, "127.0.0.1", 0, limits=Http1Limits())
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        handles = set()
        for _ in range(50):
            writer.write(REQUEST)
            assert (await read_reply(reader)).startswith(b"HTTP/1.1 200")
            (protocol,) = server.connections
            handles.add(id(protocol.timer))
        # Head, body and idle limits are armed for each request; the handle stays the same.
        assert len(handles) == 1 and protocol.deadline_s is not None
        writer.close()
    finally:
        await server.stop(0.5)


async def test_limits_still_fire_on_time_after_kept_alive_requests() -> None:
    limits = Http1Limits(head_timeout_s=0.3, body_timeout_s=0.3, idle_timeout_s=1.0)
    server = Http1Server(ok_app, "127.0.0.1", 0, limits=limits)
    await server.start()
    try:
        # A request head that stops half-way after good requests: 408 after head_timeout_s.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(3):
            writer.write(REQUEST)
            await read_reply(reader)
        t0 = time.monotonic()
        writer.write(b"POST /x HTTP/1.1\r\nHost: r\r\n")
        reply = await asyncio.wait_for(reader.read(65536), 5)
        assert reply.startswith(b"HTTP/1.1 408") and b"request head not received within 0.3 s" in reply
        assert 0.25 <= time.monotonic() - t0 < 1.0
        writer.close()
        # An idle kept-alive connection closes after idle_timeout_s (longer than the tick).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(REQUEST)
        await read_reply(reader)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(65536), 5) == b""
        assert 0.9 <= time.monotonic() - t0 < 1.8
        writer.close()
    finally:
        await server.stop(0.5)


async def test_the_disconnect_extension_resolves_when_the_client_leaves() -> None:
    seen: list[asyncio.Future[None]] = []
    left = asyncio.Event()

    async def waiting_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        gone = scope["extensions"]["tokenyard.disconnected"]
        seen.append(gone)
        gone.add_done_callback(lambda _: left.set())
        await asyncio.sleep(10)  # cancelled by the server's stop at the latest

    server = Http1Server(waiting_app, "127.0.0.1", 0, limits=Http1Limits())
    await server.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(REQUEST)
        await writer.drain()
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen and not seen[0].done()
        writer.close()
        await asyncio.wait_for(left.wait(), 5)
        assert seen[0].done()
    finally:
        await server.stop(0.2)


# -- the engine client's one timer per connection (router/proxy.py) ----------------------

async def _engine(handler: Any) -> tuple[asyncio.Server, int]:
    """A raw loopback engine: `handler(reader, writer)` per connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_engine_waits_reuse_one_timer_and_still_time_out_on_time() -> None:
    from router.proxy import UpstreamError, UpstreamPool

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            if body == b"stall":  # headers and one chunk, then nothing
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
                await writer.drain()
                await asyncio.sleep(30)
                return
            if body == b"silent":  # no answer at all
                await asyncio.sleep(30)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server, port = await _engine(handler)
    pool = UpstreamPool(f"http://127.0.0.1:{port}")
    try:
        timers = set()
        for _ in range(30):
            response = await pool.request("POST", "/v1/x", b"fast", headers_timeout_s=5.0)
            assert await response.read_all(5.0) == b"ok"
            (conn,) = pool.connections()
            timers.add(id(conn._timer))
        # 30 timed header waits and 30 timed body reads on one kept-alive connection: one handle.
        assert len(timers) == 1 and conn._timer is not None
        # The same connection, after those: a silent engine still times out at its own deadline.
        t0 = time.monotonic()
        try:
            await pool.request("POST", "/v1/x", b"silent", headers_timeout_s=0.3)
        except UpstreamError as exc:
            assert exc.kind == "timeout"
        else:
            raise AssertionError("no timeout")
        assert 0.25 <= time.monotonic() - t0 < 1.5
        # A stream that stalls after its first chunk: the chunk wait times out too.
        response = await pool.request("POST", "/v1/x", b"stall", headers_timeout_s=5.0)
        assert await response.next_chunk(5.0) == b"hi"
        t0 = time.monotonic()
        try:
            await response.next_chunk(0.3)
        except UpstreamError as exc:
            assert exc.kind == "timeout" and "no body chunk within 0.300 s" in str(exc)
        else:
            raise AssertionError("no timeout")
        assert 0.25 <= time.monotonic() - t0 < 1.5
    finally:
        pool.close()
        server.close()


async def test_a_wait_that_ends_does_not_untime_the_next_wait_on_its_connection() -> None:
    """A response's waiter can resume after its connection went back to the pool and the
    next request armed its own deadline there: ending the old wait must leave that armed."""
    from router.proxy import UpstreamPool

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server, port = await _engine(handler)
    pool = UpstreamPool(f"http://127.0.0.1:{port}")
    try:
        conn = await pool._connect()
        loop = asyncio.get_running_loop()
        old, new = loop.create_future(), loop.create_future()
        conn.expire_at(old, loop.time() + 5.0)
        old.set_result(None)  # answered; its waiter has not resumed yet
        conn.expire_at(new, loop.time() + 0.2)  # the next exchange on the connection
        conn.expire_done(old)  # the old waiter resumes now
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(new, 5)
        except TimeoutError:
            pass
        else:
            raise AssertionError("the next wait lost its deadline")
        assert 0.15 <= time.monotonic() - t0 < 1.5
    finally:
        pool.close()
        server.close()


# -- forwarding inline in the connection's task (router/app.py Router._forward_inline) ----

async def test_forwarding_inline_is_cancelled_when_the_client_leaves_and_the_connection_task_goes_on() -> None:
    """A client leaving mid-request cancels the work in the connection's own task (it sees
    CancelledError, as the engine attempt does to close its connection), the helper says
    so, and the task is not left cancelled: the app returns normally."""
    from router.app import Router

    events: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append("work cancelled")
            raise

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        left = await Router._forward_inline(scope["extensions"]["tokenyard.disconnected"], work())
        task = asyncio.current_task()
        events.append(f"left={left} cancelling={task.cancelling() if task else None}")
        await asyncio.sleep(0)  # not cancelled any more: this returns
        events.append("app returned")

    server = Http1Server(app, "127.0.0.1", 0, limits=Http1Limits())
    await server.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(REQUEST)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(200):
            if "app returned" in events:
                break
            await asyncio.sleep(0.01)
        assert events == ["work cancelled", "left=True cancelling=0", "app returned"]
    finally:
        await server.stop(0.2)


async def test_forwarding_inline_answers_errors_and_outside_cancellations_unchanged() -> None:
    from router.app import Router

    loop = asyncio.get_running_loop()

    async def done() -> None:
        await asyncio.sleep(0)

    async def fails() -> None:
        raise RuntimeError("engine path broke")

    gone: asyncio.Future[None] = loop.create_future()
    assert await Router._forward_inline(gone, done()) is False
    assert not gone._callbacks  # type: ignore[attr-defined]  # the watch is removed when the work ends
    try:
        await Router._forward_inline(gone, fails())
        raise AssertionError("the work's exception must propagate")
    except RuntimeError as exc:
        assert "broke" in str(exc)

    # Cancelled from outside (a server stopping), not by the client: the cancellation propagates.
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(10)

    runner = asyncio.ensure_future(Router._forward_inline(gone, slow()))
    await started.wait()
    runner.cancel()
    try:
        await runner
        raise AssertionError("an outside cancellation must propagate")
    except asyncio.CancelledError:
        pass
    assert runner.cancelled()

    # A client already gone: nothing runs.
    gone.set_result(None)
    ran: list[bool] = []

    async def never() -> None:
        ran.append(True)

    assert await Router._forward_inline(gone, never()) is True
    assert ran == []
