"""Who may call the control plane: bearer tokens -> principals with roles, TLS, bind rules.

The Admin and Picker gRPC services (router/admin_grpc.py) never run unauthenticated. A
caller sends `authorization: Bearer <token>` metadata; `AuthInterceptor` maps the token
to a `Principal` (a name and its roles), checks the roles the method needs
(`METHOD_ROLES`), and refuses everything else with UNAUTHENTICATED (no or unknown token)
or PERMISSION_DENIED (known token, role missing). Every refusal is logged, rate-limited
per reason (and per principal and method for role refusals) so a caller hammering the
port cannot flood the log; tokens are never logged, only the principal's name. Token
files are read once at start: rotating a token means restarting the router.

Roles are ordered `viewer < operator < admin` (each includes the ones before it), plus
`picker` for gateways that only call Pick (admin includes it). The admin issue's role
model builds on this table: a new method gets a row in `METHOD_ROLES`.

Tokens come from a static file (`tokens_file`, YAML) or a Kubernetes Secret mount
(`tokens_dir`: one file per principal, the file name is the principal, its content the
token, role `admin` unless a `<name>.roles` file lists others), and, with
`token_review:`, from Kubernetes ServiceAccounts: a token not in the table is validated by
the API server's TokenReview and mapped to roles by config (router/token_review.py;
cached for a short TTL, fail closed). Only SHA-256 digests of
tokens are kept in memory; lookup is one dict access on the digest, so its timing says
nothing about the token.

    control:
      host: 127.0.0.1          # a non-loopback address needs tls, or allow_plaintext: true
      port: 50051
      tokens_file: /etc/tokenyard/control-tokens.yaml
      #   tokens: [{principal: ops, roles: [admin], token: "..."},
      #            {principal: envoy, roles: [picker], token_sha256: "<hex>"}]
      tls: {cert_file: tls.crt, key_file: tls.key, client_ca_file: ca.crt}  # client CA: mTLS
      registration_cidrs: [10.0.0.0/8]   # RegisterInstance URLs must resolve inside these
      token_review: {roles: [{service_account: ops/oncall, roles: [operator]}]}  # router/token_review.py
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from router.token_review import TokenReviewer, TokenReviewSettings, parse_token_review
from tokenyard.config import ConfigError, check_keys, get
from tokenyard.logs import RateLimitedLog
from tokenyard.worker_auth import bearer_token, is_loopback

log = logging.getLogger(__name__)
_denials = RateLimitedLog(log, interval_s=10.0)

ROLE_LEVELS = {"viewer": 1, "operator": 2, "admin": 3}
ROLES = (*ROLE_LEVELS, "picker")

#: The role each method needs (full gRPC method name). A method not listed needs admin.
METHOD_ROLES: dict[str, str] = {
    "/tokenyard.v1.Admin/GetPolicy": "viewer",
    "/tokenyard.v1.Admin/ListPolicies": "viewer",
    "/tokenyard.v1.Admin/ListPools": "viewer",
    "/tokenyard.v1.Admin/ListInstances": "viewer",
    "/tokenyard.v1.Admin/RegisterInstance": "operator",
    "/tokenyard.v1.Admin/DeregisterInstance": "operator",
    "/tokenyard.v1.Admin/Heartbeat": "operator",
    "/tokenyard.v1.Admin/DrainInstance": "operator",
    "/tokenyard.v1.Admin/PutPolicy": "admin",
    "/tokenyard.v1.Admin/DeletePolicy": "admin",
    "/tokenyard.v1.Picker/Pick": "picker",
    # versioned policies (router/policy_admin.py); their writes need admin (the default)
    "/tokenyard.v1.Admin/GetPolicyVersion": "viewer",
    "/tokenyard.v1.Admin/ListCurrentPolicies": "viewer",
    "/tokenyard.v1.Admin/PolicyHistory": "viewer",
    # cordon, an operator's migration, the plan (router/fleet_admin.py)
    "/tokenyard.v1.Admin/CordonInstance": "operator",
    "/tokenyard.v1.Admin/TriggerMigration": "operator",
    "/tokenyard.v1.Admin/GetPlan": "viewer",
    "/tokenyard.v1.Admin/RecentRecords": "viewer",  # router/records_admin.py
}

#: The principal of the call being served (set by AuthInterceptor; None outside a call).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "tokenyard_control_principal", default=None)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[str] = frozenset({"admin"})

    def may(self, role: str) -> bool:
        """True when one of the principal's roles grants `role`."""
        if role in self.roles or "admin" in self.roles:
            return True
        needed = ROLE_LEVELS.get(role)
        return needed is not None and any(ROLE_LEVELS.get(r, 0) >= needed for r in self.roles)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    """SHA-256 of a token -> Principal."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._by_digest: dict[str, Principal] = {}
        for digest, principal in entries:
            self._by_digest[digest] = principal

    def __len__(self) -> int:
        return len(self._by_digest)

    def principal(self, token: str) -> Principal | None:
        return self._by_digest.get(token_digest(token))

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        """`tokens: [{principal, roles, token | token_sha256}]` from a YAML file."""
        where = str(path)
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(where, f"cannot read the control tokens file: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(where, f"not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list) or not doc["tokens"]:
            raise ConfigError(where, "expected {tokens: [{principal, roles, token or token_sha256}, ...]}")
        entries = []
        for i, raw in enumerate(doc["tokens"]):
            at = f"{where}: tokens[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(at, "expected a mapping {principal, roles, token or token_sha256}")
            check_keys(raw, ("principal", "roles", "token", "token_sha256"), at)
            name = get(raw, "principal", str, at)
            roles = _roles(raw.get("roles", ["admin"]), f"{at}.roles")
            if ("token" in raw) == ("token_sha256" in raw):
                raise ConfigError(at, "expected exactly one of token and token_sha256")
            if "token" in raw:
                token = get(raw, "token", str, at)
                if len(token) < 16:
                    raise ConfigError(f"{at}.token", "expected at least 16 characters (use `openssl rand -hex 32`)")
                digest = token_digest(token)
            else:
                digest = get(raw, "token_sha256", str, at).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ConfigError(f"{at}.token_sha256", "expected 64 hex digits (sha256sum of the token)")
            entries.append((digest, Principal(name, roles)))
        return cls(entries)

    @classmethod
    def from_dir(cls, path: str | Path) -> TokenTable:
        """A Kubernetes Secret mount: file name = principal, content = token."""
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(str(path), "control tokens_dir: not a directory (mount the Secret there)")
        entries = []
        for item in sorted(root.iterdir()):
            # A Secret mount holds ..data and timestamped dirs next to the key symlinks.
            if item.name.startswith(".") or item.name.endswith(".roles") or not item.is_file():
                continue
            token = item.read_text(encoding="utf-8").strip()
            if len(token) < 16:
                raise ConfigError(str(item), "expected a token of at least 16 characters")
            roles_file = root / f"{item.name}.roles"
            roles = frozenset({"admin"})
            if roles_file.is_file():
                roles = _roles(roles_file.read_text(encoding="utf-8").split(), str(roles_file))
            entries.append((token_digest(token), Principal(item.name, roles)))
        if not entries:
            raise ConfigError(str(path), "control tokens_dir holds no token files")
        return cls(entries)


def _roles(raw: Any, where: str) -> frozenset[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(r, str) for r in raw):
        raise ConfigError(where, f"expected a non-empty list of roles from {', '.join(ROLES)}")
    unknown = sorted(set(raw) - set(ROLES))
    if unknown:
        raise ConfigError(where, f"unknown role {unknown[0]!r}; known: {', '.join(ROLES)}")
    return frozenset(raw)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(slots=True)
class ControlAuth:
    """How the control server authenticates (built from the config's `control:` section)."""

    tokens_file: str | None = None
    tokens_dir: str | None = None
    tls: TlsFiles | None = None
    registration_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_plaintext: bool = False
    tokens: TokenTable | None = field(default=None, repr=False)
    token_review: TokenReviewSettings | None = None
    reviewer: TokenReviewer | None = field(default=None, repr=False)  # built from token_review at start

    def load_tokens(self) -> TokenTable:
        """The token table (read once; files are read at start, not per call)."""
        if self.tokens is None:
            if self.tokens_file is not None:
                self.tokens = TokenTable.from_file(self.tokens_file)
            elif self.tokens_dir is not None:
                self.tokens = TokenTable.from_dir(self.tokens_dir)
            elif self.token_review is not None:
                self.tokens = TokenTable()  # ServiceAccount tokens only
            else:
                raise ConfigError("control", "expected tokens_file, tokens_dir or token_review: the control plane "
                                             "never runs without authentication")
        return self.tokens

    def load_reviewer(self) -> TokenReviewer | None:
        """The TokenReview client of `token_review` (None when not configured)."""
        if self.reviewer is None and self.token_review is not None:
            self.reviewer = TokenReviewer(self.token_review)
        return self.reviewer

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls is None:
            return None
        try:
            cert = Path(self.tls.cert_file).read_bytes()
            key = Path(self.tls.key_file).read_bytes()
            ca = Path(self.tls.client_ca_file).read_bytes() if self.tls.client_ca_file else None
        except OSError as exc:
            raise ConfigError("control.tls", f"cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    @classmethod
    def with_tokens(cls, table: TokenTable, **kwargs: Any) -> ControlAuth:
        """For code and tests that hold the tokens already."""
        return cls(tokens=table, **kwargs)


CONTROL_KEYS = ("host", "port", "tokens_file", "tokens_dir", "tls", "registration_cidrs", "allow_plaintext",
                "token_review")


def parse_control_auth(control: dict[str, Any], host: str, where: str) -> ControlAuth:
    """The auth part of the config's `control:` section (shape only; files are read at start)."""
    tokens_file = get(control, "tokens_file", str, where, default=None)
    tokens_dir = get(control, "tokens_dir", str, where, default=None)
    review = (parse_token_review(control["token_review"], f"{where}.token_review", _roles)
              if control.get("token_review") is not None else None)
    if tokens_file is not None and tokens_dir is not None:
        raise ConfigError(where, "expected at most one of tokens_file (YAML of tokens) and tokens_dir (a Secret mount)")
    if tokens_file is None and tokens_dir is None and review is None:
        raise ConfigError(where, "expected one of tokens_file (YAML of tokens) and tokens_dir (a Secret mount), or "
                                 "token_review (Kubernetes ServiceAccount tokens): the Admin and Picker services need "
                                 "bearer tokens")
    tls = None
    raw_tls = control.get("tls")
    if raw_tls is not None:
        if not isinstance(raw_tls, dict):
            raise ConfigError(f"{where}.tls", "expected {cert_file, key_file, client_ca_file}")
        check_keys(raw_tls, ("cert_file", "key_file", "client_ca_file"), f"{where}.tls")
        tls = TlsFiles(get(raw_tls, "cert_file", str, f"{where}.tls"), get(raw_tls, "key_file", str, f"{where}.tls"),
                       get(raw_tls, "client_ca_file", str, f"{where}.tls", default=None))
    allow_plaintext = get(control, "allow_plaintext", bool, where, default=False)
    if tls is None and not allow_plaintext and not is_loopback(host):
        raise ConfigError(f"{where}.host", f"{host} is not a loopback address: configure tls (tokens in plaintext "
                                           "over a network can be read), or set allow_plaintext: true")
    cidrs = []
    for i, raw in enumerate(get(control, "registration_cidrs", list, where, default=[])):
        try:
            cidrs.append(ipaddress.ip_network(str(raw), strict=False))
        except ValueError:
            raise ConfigError(f"{where}.registration_cidrs[{i}]", f"expected a CIDR like 10.0.0.0/8, got {raw!r}") \
                from None
    return ControlAuth(tokens_file=tokens_file, tokens_dir=tokens_dir, tls=tls, registration_cidrs=tuple(cidrs),
                       allow_plaintext=allow_plaintext, token_review=review)


def in_cidrs(addresses: Sequence[str], cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """True when every address lies in one of `cidrs` (and there is at least one)."""
    if not addresses:
        return False
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return False
        if not any(address.version == net.version and address in net for net in cidrs):
            return False
    return True


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call carries a known bearer token whose principal has the method's role."""

    def __init__(self, tokens: TokenTable, method_roles: dict[str, str] | None = None,
                 open_prefixes: tuple[str, ...] = (), reviewer: TokenReviewer | None = None) -> None:
        self.tokens = tokens
        self.reviewer = reviewer  # ServiceAccount tokens: asked when a token is not in `tokens`
        self.method_roles = METHOD_ROLES if method_roles is None else method_roles
        # Methods that need no token (gRPC health of the ext_proc picker: kubelet probes and
        # Envoy's health checks carry none, and health says nothing an attacker can use).
        self.open_prefixes = open_prefixes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self.open_prefixes and method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        principal = self.tokens.principal(token) if token is not None else None
        reason = "missing bearer token" if token is None else "unknown bearer token"
        if principal is None and token is not None and self.reviewer is not None:
            reviewed = await self.reviewer.review(token)
            if reviewed.refusal:
                reason = reviewed.refusal
            else:
                principal = Principal(reviewed.name, reviewed.roles)
        if principal is None:
            _denials.warning(f"unauthenticated:{reason}", "control call denied",
                             extra={"method": method, "reason": reason})
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         f"{reason}: send metadata 'authorization: Bearer <token>' with a token from the "
                         "router's control tokens" + (" or a ServiceAccount token" if self.reviewer else ""))
        role = self.method_roles.get(method, "admin")
        if not principal.may(role):
            _denials.warning(f"denied:{principal.name}:{method}", "control call denied",
                             extra={"method": method, "principal": principal.name, "needs_role": role})
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         f"principal {principal.name!r} lacks role {role!r} needed for {method}")
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def with_principal(request: Any, context: grpc.aio.ServicerContext) -> Any:
            reset = current_principal.set(principal)
            try:
                return await inner(request, context)
            finally:
                current_principal.reset(reset)

        return grpc.unary_unary_rpc_method_handler(
            with_principal, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


# -- the client side (admin CLI, tests, `tokenyard up`) --------------------------------
class _BearerClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        metadata = list(client_call_details.metadata or ()) + [self._metadata]
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request)


class _BearerStreamClientInterceptor(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Server-streaming calls (Admin RecentRecords) carry the token too (grpc.aio files an
    interceptor under one kind only, so this is a class of its own)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        metadata = list(client_call_details.metadata or ()) + [self._metadata]
        return await continuation(client_call_details._replace(metadata=metadata), request)


def control_channel(address: str, token: str, *, ca_file: str | None = None,
                    server_name: str | None = None) -> grpc.aio.Channel:
    """A channel to the control server that sends `token` with every call (TLS with `ca_file`)."""
    interceptors: list[Any] = [_BearerClientInterceptor(token), _BearerStreamClientInterceptor(token)]
    if ca_file is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def write_token_file(path: str | Path, principal: str = "local-admin", roles: Sequence[str] = ("admin",)) -> str:
    """Generate a token and write a tokens_file holding it (mode 0600); returns the token."""
    token = secrets.token_urlsafe(32)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump({"tokens": [{"principal": principal, "roles": list(roles), "token": token}]}, out)
    os.replace(tmp, target)  # never a half-written tokens file
    return token
