"""Who may call an engine's Worker gRPC service: one shared-secret bearer token.

The Worker service (proto/tokenyard/v1/worker.proto) orders live migrations: MigrateOut
names a destination, so anyone who can call it could have another tenant's running
request (its KV state) sent to an endpoint of their choosing. Every engine of a fleet
therefore holds the same token (`tokenyard engine --worker-token-file PATH`, or env
TOKENYARD_WORKER_TOKEN_FILE), and every caller sends it as `authorization: Bearer
<token>`: the router (Status stream, migration calls; `load.worker_token_file` in its
config) and a source engine dialling the destination's MigrateIn (its own token).

`WorkerAuthInterceptor` compares the token in constant time (`hmac.compare_digest`) and
answers UNAUTHENTICATED otherwise; denials are logged rate-limited per reason, never the
token. An engine without a token serves only on loopback (`check_bind`). This module
lives in tokenyard/ because both sim/ (the engine) and router/ (its clients) use it and
neither may import the other.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from tokenyard.config import ConfigError
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)
_denials = RateLimitedLog(log, interval_s=10.0)

ENV_TOKEN_FILE = "TOKENYARD_WORKER_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096  # a token is tens of characters; a large file is the wrong file


def read_worker_token(path: str | Path, where: str | None = None) -> str:
    """The token in `path`: a file only its owner may read (0600), of >= 16 characters."""
    at = where or str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(at, f"worker token file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(at, f"worker token file {path} is mode {stat.S_IMODE(info.st_mode):04o}; expected 0600 "
                                  f"(chmod 600 {path}): others must not read the token")
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(at, f"worker token file {path}: {info.st_size} bytes; expected one token line")
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(at, f"cannot read the worker token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(at, f"worker token file {path}: not UTF-8 text") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(at, f"worker token file {path}: expected one token of at least {MIN_TOKEN_CHARS} "
                              "characters without spaces (e.g. `openssl rand -hex 32`)")
    return token


def write_worker_token(path: str | Path) -> str:
    """Generate a token and write it to `path` (mode 0600, atomically); returns the token."""
    token = secrets.token_urlsafe(32)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    os.replace(tmp, target)  # never a half-written token file
    return token


def token_file_from_env(path: str | None) -> str | None:
    """`path`, or else the file named by TOKENYARD_WORKER_TOKEN_FILE (None when neither)."""
    return path or os.environ.get(ENV_TOKEN_FILE) or None


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1); the one check every bind rule uses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve the Worker service off loopback without a token (ConfigError)."""
    if token is None and not is_loopback(host):
        raise ConfigError("--grpc-port", f"refusing to serve the Worker gRPC service on {host} without a token: "
                                         f"pass --worker-token-file PATH (or set {ENV_TOKEN_FILE}), or bind "
                                         "to 127.0.0.1")


# -- the server side --------------------------------------------------------------------
def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry (None without one)."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _deny_like(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts UNAUTHENTICATED.

    Same kind, because a unary handler on a streaming method would wait for a request
    message a streaming client may never send before the refusal goes out.
    """
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort raises first

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class WorkerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call carries `authorization: Bearer <the fleet's worker token>`."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode("utf-8")

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode("utf-8"), self._expected):
            return await continuation(handler_call_details)
        reason = "missing bearer token" if token is None else "wrong bearer token"
        method = handler_call_details.method
        _denials.warning(f"worker-unauthenticated:{reason}", "worker call denied",
                         extra={"method": method, "reason": reason})
        handler = await continuation(handler_call_details)
        return _deny_like(handler, f"{reason}: send metadata 'authorization: Bearer <token>' with the fleet's "
                                   "worker token (--worker-token-file)")


def server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a Worker server (none without a token: loopback dev only)."""
    return [WorkerAuthInterceptor(token)] if token is not None else []


# -- the client side --------------------------------------------------------------------
class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=list(details.metadata or ()) + [self._metadata])


# One class per call kind: grpc.aio files each interceptor under the first kind it is an
# instance of, so a single class deriving from all four would only see unary calls.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def worker_channel(address: str, token: str | None, options: Sequence[tuple[str, Any]] | None = None
                   ) -> grpc.aio.Channel:
    """A channel to an engine's Worker service that sends `token` with every call."""
    interceptors = None
    if token is not None:
        interceptors = [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary,
                                                 _BearerStreamStream)]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
