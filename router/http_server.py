"""The front door's HTTP server: the router's ASGI app (`router.app.Router`) on Tokenyard's
one HTTP/1.1 server (tokenyard/asgi_server.py, bounded in every input), on the running
event loop (`RouterServer`: CLI, `tokenyard up`, tests).

uvicorn was the alternative until the side-by-side measurement in bench/http_server.py
(docs/benchmarks.md, "Front-door HTTP server"): equal throughput within noise, and it
failed the hostile cases the built-in server bounds, so its path was deleted.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from tokenyard.asgi_server import Http1Limits, Http1Protocol, Http1Server

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger(__name__)

#: The front door's connection type (kept under its old name for tests and tools).
FrontDoorProtocol = Http1Protocol


class RouterServer:
    """The router served over HTTP on the running event loop.

    `limits` default to Http1Limits with the body limit from the router config
    (`limits.max_request_bytes`)."""

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                 limits: Http1Limits | None = None) -> None:
        self.router = router
        self.host = host
        self.port = port
        self.reuse_port = reuse_port  # several worker processes share the port (SO_REUSEPORT)
        self.limits = limits or Http1Limits(max_body_bytes=router.config.max_request_bytes)
        self._http = Http1Server(router, host, port, limits=self.limits, reuse_port=reuse_port, name="router")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def connections(self) -> set[Http1Protocol]:
        return self._http.connections

    @property
    def http(self) -> Http1Server:
        return self._http

    def client_sockets(self) -> list[socket.socket]:
        """Accepted client sockets (for tests of socket options)."""
        return self._http.client_sockets()

    async def start(self) -> None:
        if not self.router.started:
            await self.router.start()
        try:
            await self._http.start()
        except OSError:
            await self.router.stop()  # nothing half-started stays behind
            raise
        self.port = self._http.port
        log.info("router listening", extra={"url": self.url})

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._http.stop(grace_s)
        await self.router.stop()
