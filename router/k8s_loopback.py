"""A loopback stand-in for the Kubernetes API server: Pods and EndpointSlices, list + watch.

It is a real HTTP/1.1 server on 127.0.0.1 that speaks the wire format the official
`kubernetes` client uses, so `router.discovery.KubernetesDiscovery` is tested with the
real client end to end, and `tokenyard up` can demo Kubernetes discovery without a cluster:

- `GET /api/v1/namespaces/{ns}/pods` and
  `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` (also cluster-wide
  `/api/v1/pods`, `/apis/discovery.k8s.io/v1/endpointslices`) with `labelSelector`
  (equality and set-based), answering a List object (`apiVersion`, `kind`,
  `metadata.resourceVersion`, `items`).
- `?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T`: a chunked
  stream of newline-delimited events `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
  "object": ...}`. As in the real watch cache, an object that stops (starts) matching
  the selector is reported as DELETED (ADDED) to that watcher; no resourceVersion (or
  "0") starts with synthetic ADDED events for the current state.
- A resourceVersion older than the compacted history gets HTTP 200 with one ERROR event
  carrying a `Status` with code 410 (reason Expired, "too old resource version"), which
  is what the real server sends and what makes clients re-list.

- Single objects with optimistic concurrency, for leader election and pool scaling:
  Leases (`/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`: GET, POST,
  PUT, DELETE) and a Deployment's scale subresource
  (`/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`: GET and PUT, as an
  autoscaling/v1 Scale), and a Pod's metadata by JSON merge patch
  (`PATCH /api/v1/namespaces/{ns}/pods/{name}`: the scale-down's deletion cost). A PUT
  whose `metadata.resourceVersion` is not the stored one gets 409 Conflict, a POST of an
  existing name 409 AlreadyExists, a missing object 404, all as `Status` objects;
  `?dryRun=All` validates and answers without storing.

- TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`, 201 Created): the
  tokens `add_token()` issued are authenticated with their user, groups and audiences;
  any other token gets `status.authenticated: false` with an error, as the real server
  answers; a review for audiences the token was not issued for is not authenticated.
  `token_reviews` counts the reviews answered.

Tests drive it through a Python API: `apply()` / `delete()` objects, `bookmark()`,
`compact()` history, `close_watches()` (end every open watch, cleanly or abruptly).
Resource versions are one global counter, like etcd's revision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = {
    # resource -> (apiVersion, kind)
    "pods": ("v1", "Pod"),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
    "leases": ("coordination.k8s.io/v1", "Lease"),
    "deployments": ("apps/v1", "Deployment"),
}

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # what the real server issues for

_OBJECT_PATHS = [
    re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<res>leases)(?:/(?P<name>[^/]+))?$"),
    re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/(?P<res>deployments)/(?P<name>[^/]+)(?P<scale>/scale)?$"),
    re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>pods)/(?P<name>[^/]+)$"),
]

_PATHS = [
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>pods)$"), True),
    (re.compile(r"^/api/v1/(?P<res>pods)$"), False),
    (re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<res>endpointslices)$"), True),
    (re.compile(r"^/apis/discovery\.k8s\.io/v1/(?P<res>endpointslices)$"), False),
]


class SelectorError(ValueError):
    pass


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics: `a=b`, `a==b`, `a!=b`, `a`, `!a`,
    `a in (x,y)`, `a notin (x,y)`, comma = AND."""
    for term in _split_selector(selector or ""):
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            ok = labels.get(key) in values if op == "in" else labels.get(key) not in values
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = (s.strip() for s in term.split("==" if "==" in term else "=", 1))
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        elif re.fullmatch(r"[\w./-]+", term):
            ok = term in labels
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
        if not ok:
            return False
    return True


@dataclass
class _Event:
    seq: int  # position in the event log (bookmarks included)
    rv: int  # resourceVersion of the change (bookmarks: the current one)
    resource: str
    namespace: str
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    old: dict[str, Any] | None
    new: dict[str, Any] | None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class LoopbackKubeAPI:
    """The server and its object store. `start()` binds a free port; `host` is its URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Condition()
        self._rv = 100  # the real server's counter never starts at 0 either
        self._seq = 0
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._log: list[_Event] = []
        self._compacted_rv = 0  # watches from an rv below this get 410 Gone
        self._generation = 0  # bumped by close_watches()
        self._abrupt = False
        self._stopped = False
        self.requests: list[str] = []  # "METHOD /path?query" of every request, for tests
        self.watches_opened = 0
        self._open_watches = 0
        self._holding = False
        self.watches_held = 0  # watch requests that arrived while held
        self._tokens: dict[str, dict[str, Any]] = {}  # token -> {username, uid, groups, audiences}
        self.token_reviews = 0
        self._connections: set[socket.socket] = set()  # open client connections (cut by stop())
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def setup(self) -> None:
                super().setup()
                with api._lock:
                    api._connections.add(self.connection)

            def finish(self) -> None:
                with api._lock:
                    api._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                if not api._handle_object(self):
                    api._handle(self)

            def do_POST(self) -> None:
                if urlsplit(self.path).path == TOKEN_REVIEW_PATH:
                    api._token_review(self)
                elif not api._handle_object(self):
                    api._not_found(self)

            def do_PUT(self) -> None:
                if not api._handle_object(self):
                    api._not_found(self)

            def do_DELETE(self) -> None:
                if not api._handle_object(self):
                    api._not_found(self)

            def do_PATCH(self) -> None:
                if not api._handle_object(self):
                    api._not_found(self)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def host(self) -> str:
        host, port = self._server.server_address[:2]
        # typeshed allows bytes here (AF_UNIX-style addresses); an AF_INET server gives str.
        host_s = host.decode() if isinstance(host, bytes) else host
        return f"http://{host_s}:{port}"

    def start(self) -> LoopbackKubeAPI:
        self._thread = threading.Thread(target=self._server.serve_forever, name="k8s-loopback",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()
        # A server that stops takes its keep-alive connections with it, as a real one does:
        # a client must not go on being answered on a pooled connection.
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> LoopbackKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Python API for tests ------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def apply(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (`resource` is "pods" or "endpointslices");
        returns the stored copy with its new resourceVersion."""
        if resource not in KINDS:
            raise ValueError(f"resource must be one of {sorted(KINDS)}, got {resource!r}")
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("object metadata.name is required")
        namespace = meta.setdefault("namespace", "default")
        api_version, kind = KINDS[resource]
        obj["apiVersion"], obj["kind"] = api_version, kind
        key = (resource, namespace, meta["name"])
        with self._lock:
            old = self._objects.get(key)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta.setdefault("uid", (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", (old or {}).get("metadata", {}).get("creationTimestamp")
                            or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._objects[key] = obj
            self._append(resource, namespace, "MODIFIED" if old else "ADDED", old, obj)
            return copy.deepcopy(obj)

    def delete(self, resource: str, name: str, namespace: str = "default") -> bool:
        with self._lock:
            old = self._objects.pop((resource, namespace, name), None)
            if old is None:
                return False
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._append(resource, namespace, "DELETED", old, gone)
            return True

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def bookmark(self) -> int:
        """Send a BOOKMARK with the current resourceVersion to every open watch that asked
        for bookmarks; returns that resourceVersion."""
        with self._lock:
            for resource in KINDS:
                self._append(resource, "", "BOOKMARK", None, None)
            return self._rv

    def compact(self) -> int:
        """Forget the event history up to now, as etcd compaction does: a watch that
        resumes from an older resourceVersion gets 410 Gone. Returns the compacted rv."""
        with self._lock:
            self._compacted_rv = self._rv
            self._log.clear()
            return self._rv

    def close_watches(self, abrupt: bool = False) -> None:
        """End every open watch: cleanly (the stream's last chunk, as on the server's
        timeout) or abruptly (the TCP connection is cut mid-stream)."""
        with self._lock:
            self._generation += 1
            self._abrupt = abrupt
            self._lock.notify_all()

    def hold_watches(self, hold: bool = True) -> None:
        """While held, new watch requests wait unanswered (an API server that is down or
        slow to come back); lists are still answered. `hold_watches(False)` lets them in."""
        with self._lock:
            self._holding = hold
            self._lock.notify_all()

    def open_watches(self) -> int:
        with self._lock:
            return self._open_watches

    def add_token(self, token: str, username: str, groups: tuple[str, ...] = ("system:authenticated",),
                  audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)) -> None:
        """Issue `token` for `username`: TokenReview authenticates it until `revoke_token`."""
        with self._lock:
            self._tokens[token] = {"username": username, "uid": str(uuid.uuid4()), "groups": list(groups),
                                   "audiences": list(audiences)}

    def revoke_token(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def _token_review(self, req: BaseHTTPRequestHandler) -> None:
        self.requests.append(f"POST {req.path}")
        length = int(req.headers.get("Content-Length") or 0)
        try:
            body = json.loads(req.rfile.read(length) or b"{}")
        except ValueError:
            self._send_json(req, 400, _status(400, "BadRequest", "the request body is not JSON"))
            return
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("kind") != "TokenReview" or not isinstance(spec, dict):
            self._send_json(req, 400, _status(400, "BadRequest", "expected a TokenReview object"))
            return
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            self._send_json(req, 422, _status(422, "Invalid", "TokenReview.authentication.k8s.io \"\" is invalid: "
                                                              "spec.token: Required value"))
            return
        wanted = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
        with self._lock:
            self.token_reviews += 1
            issued = copy.deepcopy(self._tokens.get(token))
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        if issued is None:
            status["error"] = "[invalid bearer token, service account token has been invalidated]"
        else:
            audiences = [a for a in issued["audiences"] if not wanted or a in wanted]
            if not audiences:
                status["error"] = f"[invalid bearer token, token audiences {issued['audiences']} is invalid for " \
                                  f"the target audiences {wanted}]"
            else:
                status = {"authenticated": True, "audiences": audiences,
                          "user": {"username": issued["username"], "uid": issued["uid"], "groups": issued["groups"]}}
        self._send_json(req, 201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                   "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})

    def _append(self, resource: str, namespace: str, type_: str,
                old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self._seq += 1
        self._log.append(_Event(self._seq, self._rv, resource, namespace, type_,
                                copy.deepcopy(old), copy.deepcopy(new)))
        self._lock.notify_all()

    # -- HTTP --------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        self.requests.append(f"GET {req.path}")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        for pattern, namespaced in _PATHS:
            m = pattern.match(parts.path)
            if m:
                resource = m.group("res")
                namespace = m.group("ns") if namespaced else None
                break
        else:
            self._send_json(req, 404, _status(404, "NotFound", f"the server could not find the requested resource ({parts.path})"))
            return
        selector = query.get("labelSelector", "")
        try:
            label_selector_matches(selector, {})
        except SelectorError as exc:
            self._send_json(req, 400, _status(400, "BadRequest", f"unable to parse requirement: {exc}"))
            return
        if query.get("watch") in ("true", "1"):
            self._watch(req, resource, namespace, selector, query)
        else:
            self._list(req, resource, namespace, selector)

    def _not_found(self, req: BaseHTTPRequestHandler) -> None:
        self._send_json(req, 404, _status(404, "NotFound", f"the server could not find the requested resource "
                                                           f"({urlsplit(req.path).path})"))

    def _handle_object(self, req: BaseHTTPRequestHandler) -> bool:
        """One object (a Lease, a Deployment or its scale); False if the path is not one."""
        parts = urlsplit(req.path)
        for pattern in _OBJECT_PATHS:
            m = pattern.match(parts.path)
            if m:
                break
        else:
            return False
        method = req.command
        if method != "GET":
            self.requests.append(f"{method} {req.path}")
        resource, namespace, name = m.group("res"), m.group("ns"), m.group("name")
        scale = bool(m.groupdict().get("scale"))
        dry_run = "dryRun=All" in parts.query
        body: dict[str, Any] | None = None
        if method in ("POST", "PUT", "PATCH"):
            length = int(req.headers.get("Content-Length") or 0)
            try:
                body = json.loads(req.rfile.read(length) or b"{}")
            except ValueError:
                self._send_json(req, 400, _status(400, "BadRequest", "the request body is not JSON"))
                return True
        code, answer = self._object_op(method, resource, namespace, name, scale, body, dry_run)
        self._send_json(req, code, answer)
        return True

    def _object_op(self, method: str, resource: str, namespace: str, name: str | None, scale: bool,
                   body: dict[str, Any] | None, dry_run: bool) -> tuple[int, dict[str, Any]]:
        api_version, kind = KINDS[resource]
        with self._lock:
            if method == "POST" and name is None and not scale:
                assert body is not None
                name = (body.get("metadata") or {}).get("name")
                if not name:
                    return 422, _status(422, "Invalid", f"{kind}.metadata.name: Required value")
                if (resource, namespace, name) in self._objects:
                    return 409, _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
                return 201, self._store(resource, namespace, name, body, None, dry_run)
            if name is None:
                return 405, _status(405, "MethodNotAllowed", f"{method} needs an object name")
            stored = self._objects.get((resource, namespace, name))
            if stored is None:
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            if method == "DELETE":
                if not dry_run:
                    self.delete(resource, name, namespace)
                return 200, _status(200, "Success", f'{resource} "{name}" deleted') | {"status": "Success"}
            if method == "GET":
                return 200, _scale_of(stored) if scale else copy.deepcopy(stored)
            if method == "PATCH" and not scale:  # a JSON merge patch (RFC 7386), as metadata patches use
                assert body is not None
                return 200, self._store(resource, namespace, name, _merge_patch(stored, body), stored, dry_run)
            if method != "PUT":
                return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")
            assert body is not None
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            current_rv = stored["metadata"]["resourceVersion"]
            if sent_rv and sent_rv != current_rv:
                # What the real server says when an optimistic update lost the race.
                return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the '
                                                     "object has been modified; please apply your changes to the "
                                                     "latest version and try again")
            if scale:
                replicas = (body.get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    return 422, _status(422, "Invalid", f"Scale.spec.replicas: Invalid value: {replicas!r}: must "
                                                        "be greater than or equal to 0")
                updated = copy.deepcopy(stored)
                updated.setdefault("spec", {})["replicas"] = replicas
                saved = self._store(resource, namespace, name, updated, stored, dry_run)
                return 200, _scale_of(saved)
            return 200, self._store(resource, namespace, name, body, stored, dry_run)

    def _store(self, resource: str, namespace: str, name: str, obj: dict[str, Any],
               old: dict[str, Any] | None, dry_run: bool) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["name"], meta["namespace"] = name, namespace
        meta.pop("resourceVersion", None)
        if old is not None:
            meta["uid"] = old["metadata"].get("uid")
            meta["creationTimestamp"] = old["metadata"].get("creationTimestamp")
        if dry_run:  # validated, answered, not stored
            answer = copy.deepcopy(obj)
            api_version, kind = KINDS[resource]
            answer["apiVersion"], answer["kind"] = api_version, kind
            answer["metadata"]["resourceVersion"] = (old or {}).get("metadata", {}).get("resourceVersion", "0")
            return answer
        return self.apply(resource, obj)

    def _matches(self, obj: dict[str, Any] | None, resource: str, namespace: str | None, selector: str) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        return label_selector_matches(selector, meta.get("labels") or {})

    def _list(self, req: BaseHTTPRequestHandler, resource: str, namespace: str | None, selector: str) -> None:
        api_version, kind = KINDS[resource]
        with self._lock:
            items = []
            for (res, _ns, _name), obj in sorted(self._objects.items()):
                if res == resource and self._matches(obj, resource, namespace, selector):
                    item = copy.deepcopy(obj)
                    # Items of a typed list carry no kind/apiVersion on the real server.
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                    items.append(item)
            body = {"kind": f"{kind}List", "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        self._send_json(req, 200, body)

    def _send_json(self, req: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        req.send_response(code)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _watch(self, req: BaseHTTPRequestHandler, resource: str, namespace: str | None,
               selector: str, query: dict[str, str]) -> None:
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout_s = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout_s
        rv_text = query.get("resourceVersion", "")
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()

        def send(event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            req.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            req.wfile.flush()

        def finish() -> None:
            req.wfile.write(b"0\r\n\r\n")
            req.wfile.flush()

        with self._lock:
            if self._holding:
                self.watches_held += 1
                while self._holding and not self._stopped:
                    self._lock.wait(0.5)
            self.watches_opened += 1
            generation = self._generation
            if rv_text in ("", "0"):
                pending: list[dict[str, Any]] = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (res, _ns, _n), obj in sorted(self._objects.items())
                    if res == resource and self._matches(obj, resource, namespace, selector)]
                position = self._seq
            else:
                try:
                    since_rv = int(rv_text)
                except ValueError:
                    since_rv = -1
                if since_rv < 0:
                    pending = [{"type": "ERROR", "object": _status(
                        400, "BadRequest", f"invalid resource version: {rv_text!r}")}]
                    position = None
                elif since_rv < self._compacted_rv:
                    pending = [{"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {since_rv} ({self._compacted_rv})")}]
                    position = None
                else:
                    pending = []
                    position = 0
                    for ev in self._log:
                        if ev.type != "BOOKMARK" and ev.rv > since_rv:
                            out = self._event_for(ev, resource, namespace, selector)
                            if out is not None:
                                pending.append(out)
                    position = self._seq
            self._open_watches += 1
        try:
            for event in pending:
                send(event)
            if position is None:  # an ERROR event ends the watch
                finish()
                return
            while True:
                with self._lock:
                    while (self._seq == position and not self._stopped
                           and self._generation == generation and time.monotonic() < deadline):
                        self._lock.wait(min(0.5, max(0.01, deadline - time.monotonic())))
                    if self._stopped or time.monotonic() >= deadline:
                        break
                    if self._generation != generation:
                        if self._abrupt:
                            req.close_connection = True
                            with_socket = req.connection
                            # Cut the stream without its final chunk, as a crashed or
                            # restarted API server does.
                            with_socket.shutdown(socket.SHUT_RDWR)
                            return
                        break
                    events = [ev for ev in self._log if ev.seq > position]
                    position = self._seq
                    out_events = []
                    for ev in events:
                        if ev.type == "BOOKMARK":
                            if bookmarks and ev.resource == resource:
                                api_version, kind = KINDS[resource]
                                out_events.append({"type": "BOOKMARK", "object": {
                                    "kind": kind, "apiVersion": api_version,
                                    "metadata": {"resourceVersion": str(ev.rv)}}})
                            continue
                        out = self._event_for(ev, resource, namespace, selector)
                        if out is not None:
                            out_events.append(out)
                for event in out_events:
                    send(event)
            finish()
        except (BrokenPipeError, ConnectionResetError, OSError):
            req.close_connection = True
        finally:
            with self._lock:
                self._open_watches -= 1

    def _event_for(self, ev: _Event, resource: str, namespace: str | None, selector: str) -> dict[str, Any] | None:
        if ev.resource != resource:
            return None
        was = self._matches(ev.old, resource, namespace, selector)
        now = self._matches(ev.new, resource, namespace, selector)
        if ev.type == "DELETED":
            return {"type": "DELETED", "object": copy.deepcopy(ev.new)} if was else None
        if now and was:
            return {"type": "MODIFIED", "object": copy.deepcopy(ev.new)}
        if now:
            return {"type": "ADDED", "object": copy.deepcopy(ev.new)}
        if was:  # stopped matching the selector: gone from this watcher's view
            return {"type": "DELETED", "object": copy.deepcopy(ev.new)}
        return None


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: mappings merge recursively, null deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _scale_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's scale subresource, as autoscaling/v1 Scale."""
    meta = deployment["metadata"]
    selector = (deployment.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                         "resourceVersion": meta["resourceVersion"],
                         "creationTimestamp": meta.get("creationTimestamp")},
            "spec": {"replicas": (deployment.get("spec") or {}).get("replicas", 1)},
            "status": {"replicas": (deployment.get("status") or {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))}}


# -- object builders for tests and demos -----------------------------------------------

def make_pod(name: str, ip: str, labels: dict[str, str], *, namespace: str = "default",
             ready: bool = True, phase: str = "Running", terminating: bool = False,
             port: int = 8000) -> dict[str, Any]:
    """A Pod as the API server returns it, with the fields discovery reads."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if terminating:
        meta["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:latest",
                                 "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]},
        "status": {
            "phase": phase,
            "podIP": ip if phase == "Running" else None,
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"},
                {"type": "ContainersReady", "status": "True" if ready else "False"},
            ],
        },
    }


def make_deployment(name: str, replicas: int, labels: dict[str, str], *,
                    namespace: str = "default") -> dict[str, Any]:
    """A Deployment with the fields its scale subresource shows."""
    return {"metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)},
                                  "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}}},
            "status": {"replicas": replicas}}


def make_endpoint_slice(name: str, service: str, endpoints: list[dict[str, Any]],
                        labels: dict[str, str], *, namespace: str = "default",
                        port: int = 8000, grpc_port: int | None = None) -> dict[str, Any]:
    """An EndpointSlice of `service`; `endpoints` are {ip, pod, ready, serving, terminating}."""
    ports = [{"name": "http", "port": port, "protocol": "TCP"}]
    if grpc_port is not None:
        ports.append({"name": "grpc", "port": grpc_port, "protocol": "TCP"})
    return {
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                **labels}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": [{
            "addresses": [ep["ip"]],
            "conditions": {"ready": ep.get("ready", True), "serving": ep.get("serving", ep.get("ready", True)),
                           "terminating": ep.get("terminating", False)},
            **({"targetRef": {"kind": "Pod", "name": ep["pod"], "namespace": namespace}} if ep.get("pod") else {}),
        } for ep in endpoints],
    }


# -- standalone: `python -m router.k8s_loopback --port 8001 --objects objects.yaml` -------

def load_objects(path: str) -> list[tuple[str, dict[str, Any]]]:
    """A YAML list of `{resource: pods|endpointslices, object: {...}}`; errors name the entry."""
    import yaml

    from tokenyard.config import ConfigError, yaml_error

    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text ({exc.reason}); expected a YAML file") from exc
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from exc
    if not isinstance(doc, list):
        raise ConfigError(path, "expected a list of {resource, object}")
    out = []
    for i, entry in enumerate(doc):
        where = f"{path}: [{i}]"
        if not isinstance(entry, dict) or entry.get("resource") not in KINDS or not isinstance(entry.get("object"), dict):
            raise ConfigError(where, f"expected {{resource: {' | '.join(KINDS)}, object: {{metadata: {{name}}, ...}}}}")
        if not (entry["object"].get("metadata") or {}).get("name"):
            raise ConfigError(f"{where}.object.metadata.name", "required")
        out.append((entry["resource"], entry["object"]))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from tokenyard.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="python -m router.k8s_loopback",
        description=f"Serve a loopback Kubernetes API ({', '.join(KINDS)}; list + watch) for "
                    "trying Kubernetes discovery, leader election and scaling without a cluster.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--objects", help=f"YAML list of {{resource: {'|'.join(KINDS)}, object: {{...}}}}")
    args = parser.parse_args(argv)
    try:
        objects = load_objects(args.objects) if args.objects else []
    except ConfigError as exc:
        print(f"k8s_loopback: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"k8s_loopback: --port: expected a TCP port 0-65535 (0: a free one), got {args.port}", file=sys.stderr)
        return 2
    try:
        api = LoopbackKubeAPI(port=args.port)
    except OSError as exc:
        print(f"k8s_loopback: --port {args.port}: cannot listen on 127.0.0.1 ({exc.strerror or exc})", file=sys.stderr)
        return 2
    for resource, obj in objects:
        api.apply(resource, obj)
    api.start()
    print(f"kubernetes API (loopback) at {api.host}; {len(objects)} object(s)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
