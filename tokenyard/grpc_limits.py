"""The connection limits every Tokenyard gRPC server runs with (Admin + Picker, ext_proc,
the engines' Worker service): what a peer may hold without making a call.

Authentication in gRPC is per call (router/auth.py, tokenyard/worker_auth.py), so a peer
that never calls is never refused: measured on grpcio 1.85 (tests/test_security_grpc.py),
a raw TCP connection that never sends the HTTP/2 preface was held 120 s (grpc's default
handshake timeout), one that sent the preface and no call was held for as long as it
stayed open, and the number of either had no limit but the process's file descriptors,
which the front door shares. The three channel arguments below bound all of that; each
server adds its own message size limit (`max_receive_message_length`) to these.

- `handshake_timeout_s` (`grpc.server_handshake_timeout_ms`): from accept to a complete
  HTTP/2 handshake (the HTTP front door's head timeout is 10 s, the same figure);
- `idle_timeout_s` (`grpc.max_connection_idle_ms`): a connection with no call in flight
  gets GOAWAY after this long (clients reconnect on their next call; a Status stream or
  a streaming ext_proc exchange is a call, so it is not idle);
- `max_connections` (`grpc.max_allowed_incoming_connections`): connections beyond it are
  closed at accept (the front door's cap is 4,096 too).

Tests shorten these through `DEFAULT` (read when a server is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GrpcServerLimits:
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0
    max_connections: int = 4096

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
                ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1000)),
                ("grpc.max_allowed_incoming_connections", self.max_connections)]


DEFAULT = GrpcServerLimits()


def server_options(*extra: tuple[str, Any]) -> list[tuple[str, Any]]:
    """The connection limits of `DEFAULT` (read now), then `extra` (a server's own options)."""
    return [*DEFAULT.options(), *extra]
