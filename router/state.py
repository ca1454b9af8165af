"""Shared router state behind one interface: instances, affinity, policies, load, leases.

Two backends implement `StateStore`:

- `FileStateStore` (`file:///abs/path/state.json`), the embedded default: one JSON
  document, rewritten atomically (temp file + rename) under an `fcntl` lock on a sibling
  `.lock` file, so several processes on one machine share it without losing updates and
  a crash never leaves a half-written document. Every write bumps a sequence number,
  kept in the document and mirrored in the lock file; changes are noticed by polling it
  (file timestamps are too coarse: two writes in one clock tick look the same).
- `RedisStateStore` (`redis://host:port/db?prefix=...`), for several router replicas:
  instances and policies in hashes, affinity and load as keys with a TTL, changes
  announced on a pub/sub channel.

Only membership, draining, policies and affinity claims go through the store; the
request hot path reads the in-memory `router.registry.InstanceRegistry` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import logging
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

log = logging.getLogger(__name__)

SOURCES = ("static", "kubernetes", "admin")


class StateStoreError(RuntimeError):
    """The store cannot be used: bad URL, unreadable or corrupted file, Redis down."""


class StateFileCorrupt(StateStoreError):
    """The state file exists but is not a Tokenyard state document; never reset silently."""


@dataclass(slots=True)
class InstanceRecord:
    """Where an engine instance is and what it serves; the unit of membership."""

    instance_id: str
    url: str  # http://host:port of the engine's OpenAI-compatible API
    model: str
    gpu: str = "unknown"
    pool: str = "default"
    tp: int = 1
    grpc_address: str | None = None  # host:port of its Worker gRPC service, if any
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "static"  # static | kubernetes | admin
    draining: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "instance") -> InstanceRecord:
        """Build from a decoded JSON object; a missing or mistyped field names `where`."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
        for key, kind in (("instance_id", str), ("url", str), ("model", str)):
            if not isinstance(raw.get(key), kind) or not raw.get(key):
                raise ValueError(f"{where}.{key}: expected a non-empty string, got {raw.get(key)!r}")
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"{where}.labels: expected a mapping, got {labels!r}")
        tp = raw.get("tp", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"{where}.tp: expected an integer >= 1, got {tp!r}")
        return cls(
            instance_id=raw["instance_id"],
            url=raw["url"],
            model=raw["model"],
            gpu=str(raw.get("gpu") or "unknown"),
            pool=str(raw.get("pool") or "default"),
            tp=tp,
            grpc_address=raw.get("grpc_address") or None,
            labels={str(k): str(v) for k, v in labels.items()},
            source=str(raw.get("source") or "static"),
            draining=bool(raw.get("draining", False)),
        )


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change notice from `StateStore.watch()`.

    `kind` is "instance" (put, removed or draining flipped), "policy", or "any": anything
    may have changed (sent first by every watch, once it is subscribed, so a reader that
    loads state on "any" misses nothing). `origin` is the writing store's id, so a
    reader can skip its own echoes; it is "" where unknown.
    """

    kind: str
    key: str = ""
    origin: str = ""


class StateStore(ABC):
    """Async interface of the shared state; both backends pass the same tests."""

    #: Unique per store object; tags the changes it publishes.
    origin: str

    # -- instances ---------------------------------------------------------------------
    @abstractmethod
    async def put_instance(self, record: InstanceRecord) -> None: ...

    @abstractmethod
    async def put_instance_if_absent(self, record: InstanceRecord) -> bool:
        """Add unless an instance with that id is stored (atomic); True when added."""

    @abstractmethod
    async def remove_instance(self, instance_id: str) -> bool:
        """Remove; False when it was not there."""

    @abstractmethod
    async def list_instances(self) -> list[InstanceRecord]: ...

    @abstractmethod
    async def set_draining(self, instance_id: str, draining: bool) -> bool:
        """Flip draining; False when the instance is unknown."""

    # -- affinity (session / prefix -> instance) --------------------------------------
    @abstractmethod
    async def get_affinity(self, key: str) -> str | None: ...

    @abstractmethod
    async def claim_affinity(self, key: str, instance_id: str, ttl_s: float) -> str:
        """Set `key` -> `instance_id` if absent (atomic across replicas); return the owner."""

    @abstractmethod
    async def drop_affinity(self, key: str) -> None: ...

    # -- tenant policies ---------------------------------------------------------------
    @abstractmethod
    async def get_policy(self, tenant: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def put_policy(self, tenant: str, policy: dict[str, Any]) -> None: ...

    @abstractmethod
    async def delete_policy(self, tenant: str) -> bool: ...

    @abstractmethod
    async def list_policies(self) -> dict[str, dict[str, Any]]: ...

    # -- load snapshots shared between replicas (expire on their own) -----------------
    @abstractmethod
    async def put_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None: ...

    @abstractmethod
    async def get_loads(self) -> dict[str, dict[str, Any]]: ...

    # -- leases: self-registered instances stay while they heartbeat ------------------
    @abstractmethod
    async def renew_lease(self, instance_id: str, ttl_s: float, *, only_if_alive: bool = False) -> bool:
        """Set the lease to end `ttl_s` from now (atomic); with `only_if_alive`, only a
        lease that has not expired is renewed (a heartbeat must not revive one). True
        when the lease is now alive."""

    @abstractmethod
    async def live_leases(self) -> set[str]: ...

    @abstractmethod
    async def drop_lease(self, instance_id: str) -> None: ...

    # -- changes -----------------------------------------------------------------------
    @abstractmethod
    def watch(self) -> AsyncIterator[StateChange]:
        """Changes made by any process on this store, until `close()`."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def url(self) -> str: ...


async def cancel_and_wait(*tasks: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
    """Cancel tasks and wait until they are done, cancelling again while they run.

    One cancel is not enough here: on Python 3.11 `asyncio.wait_for` swallows a cancel
    that arrives as its inner call completes, and redis-py wraps every command's send in
    `wait_for` (socket_timeout), so a task busy with Redis can miss a single cancel.
    """
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task ended with an error while cancelled",
                      extra={"task": task.get_name(), "error": str(task.exception())})
    if pending:
        log.warning("tasks did not stop after cancellation",
                    extra={"tasks": ", ".join(t.get_name() for t in pending)})


def _check_ttl(ttl_s: float, what: str) -> None:
    if not ttl_s > 0:
        raise ValueError(f"{what}: ttl_s must be > 0, got {ttl_s!r}")


# ======================================================================================
# File backend
# ======================================================================================

_DOC_FORMAT = "tokenyard-state/1"


def _empty_doc() -> dict[str, Any]:
    return {"format": _DOC_FORMAT, "instances": {}, "affinity": {}, "policies": {},
            "loads": {}, "leases": {}}


class FileStateStore(StateStore):
    """One JSON document on local disk, safe across processes (see module docstring).

    Blocking file work runs in a worker thread so the event loop never waits on disk.
    Expiring entries (affinity, load, leases) store a wall-clock deadline (`time.time()`
    since several processes must agree on it) and are dropped lazily.
    """

    def __init__(self, path: str | Path, *, poll_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        if not self.path.is_absolute():
            raise StateStoreError(f"state file path must be absolute, got {str(path)!r}")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.poll_interval_s = poll_interval_s
        self.origin = uuid.uuid4().hex
        self._closed = asyncio.Event()
        self._cache: tuple[bytes, dict[str, Any]] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateStoreError(f"cannot create the folder of state file {self.path}: {exc}") from exc
        self._read_doc_unlocked()  # fail at open time on a corrupted file, not on first use

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    # -- the document ------------------------------------------------------------------
    def _read_doc_unlocked(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return _empty_doc()
        except OSError as exc:
            raise StateStoreError(f"cannot read state file {self.path}: {exc}") from exc
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateFileCorrupt(
                f"state file {self.path} is corrupted: invalid JSON at line {exc.lineno} "
                f"column {exc.colno} ({exc.msg}); expected a {_DOC_FORMAT} document. Fix or "
                f"remove it (it is never reset automatically)") from exc
        if not isinstance(doc, dict) or doc.get("format") != _DOC_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise StateFileCorrupt(
                f"state file {self.path} is not a {_DOC_FORMAT} document (format: {got!r}); "
                f"fix or remove it (it is never reset automatically)")
        for section in ("instances", "affinity", "policies", "loads", "leases"):
            if not isinstance(doc.setdefault(section, {}), dict):
                raise StateFileCorrupt(
                    f"state file {self.path}: section {section!r} is not an object")
        return doc

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[int]:
        # flock locks belong to the open file description, so this serialises threads of
        # this process as well as other processes.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _write_doc_unlocked(self, doc: dict[str, Any], durable: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, separators=(",", ":"), sort_keys=True)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self) -> dict[str, Any]:
        """The document, parsed again only when a write happened since the last read
        (the lock file holds the write sequence). Callers must not mutate the result."""
        with self._locked(exclusive=False) as lock_fd:
            seq = os.pread(lock_fd, 20, 0)
            cached = self._cache
            if seq and cached is not None and cached[0] == seq:
                return cached[1]
            doc = self._read_doc_unlocked()
            if seq:
                self._cache = (seq, doc)  # one tuple: threads see both fields or neither
            return doc

    def _update(self, mutate: Callable[[dict[str, Any]], Any], durable: bool = True) -> Any:
        """Read-modify-write under the exclusive lock; `mutate` returns (result, changed).

        `durable=False` skips the fsync for soft state (affinity, load, leases), which is
        on the request path and harmless to lose in a power cut; the rename still makes
        every write all-or-nothing for readers.
        """
        with self._locked(exclusive=True) as lock_fd:
            doc = self._read_doc_unlocked()
            result, changed = mutate(doc)
            if changed:
                doc["seq"] = int(doc.get("seq", 0)) + 1
                self._write_doc_unlocked(doc, durable)
                os.pwrite(lock_fd, f"{doc['seq']:020d}".encode(), 0)
            return result

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # -- instances ---------------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None:
        data = record.to_dict()

        def mutate(doc: dict[str, Any]) -> tuple[None, bool]:
            changed = doc["instances"].get(record.instance_id) != data
            doc["instances"][record.instance_id] = data
            return None, changed

        await self._run(self._update, mutate)

    async def put_instance_if_absent(self, record: InstanceRecord) -> bool:
        data = record.to_dict()

        def mutate(doc: dict[str, Any]) -> tuple[bool, bool]:
            if record.instance_id in doc["instances"]:
                return False, False
            doc["instances"][record.instance_id] = data
            return True, True

        return bool(await self._run(self._update, mutate))

    async def remove_instance(self, instance_id: str) -> bool:
        def mutate(doc: dict[str, Any]) -> tuple[bool, bool]:
            found = doc["instances"].pop(instance_id, None) is not None
            doc["leases"].pop(instance_id, None)
            return found, found

        return bool(await self._run(self._update, mutate))

    async def list_instances(self) -> list[InstanceRecord]:
        doc = await self._run(self._read)
        return [InstanceRecord.from_dict(raw, f"{self.path}: instances.{iid}")
                for iid, raw in doc["instances"].items()]

    async def set_draining(self, instance_id: str, draining: bool) -> bool:
        def mutate(doc: dict[str, Any]) -> tuple[bool, bool]:
            raw = doc["instances"].get(instance_id)
            if raw is None:
                return False, False
            changed = raw.get("draining") != draining
            raw["draining"] = draining
            return True, changed

        return bool(await self._run(self._update, mutate))

    # -- affinity ----------------------------------------------------------------------
    async def get_affinity(self, key: str) -> str | None:
        doc = await self._run(self._read)
        entry = doc["affinity"].get(key)
        if entry is None or entry["expires_s"] <= time.time():
            return None
        return str(entry["owner"])

    async def claim_affinity(self, key: str, instance_id: str, ttl_s: float) -> str:
        _check_ttl(ttl_s, f"claim_affinity({key!r})")
        # The common case, a live owner, needs only the (cached) shared-lock read.
        owner = await self.get_affinity(key)
        if owner is not None:
            return owner

        def mutate(doc: dict[str, Any]) -> tuple[str, bool]:
            now = time.time()
            entry = doc["affinity"].get(key)
            if entry is not None and entry["expires_s"] > now:
                return str(entry["owner"]), False
            # Expired entries are swept here, on the writer's lock, rather than by a timer.
            for stale in [k for k, e in doc["affinity"].items() if e["expires_s"] <= now]:
                del doc["affinity"][stale]
            doc["affinity"][key] = {"owner": instance_id, "expires_s": now + ttl_s}
            return instance_id, True

        return str(await self._run(self._update, mutate, False))

    async def drop_affinity(self, key: str) -> None:
        def mutate(doc: dict[str, Any]) -> tuple[None, bool]:
            return None, doc["affinity"].pop(key, None) is not None

        await self._run(self._update, mutate, False)

    # -- policies ----------------------------------------------------------------------
    async def get_policy(self, tenant: str) -> dict[str, Any] | None:
        doc = await self._run(self._read)
        policy = doc["policies"].get(tenant)
        return copy.deepcopy(policy) if policy is not None else None

    async def put_policy(self, tenant: str, policy: dict[str, Any]) -> None:
        if not tenant:
            raise ValueError("put_policy: tenant must be a non-empty string")
        data = json.loads(json.dumps(policy))  # only JSON values are stored; fail early

        def mutate(doc: dict[str, Any]) -> tuple[None, bool]:
            changed = doc["policies"].get(tenant) != data
            doc["policies"][tenant] = data
            return None, changed

        await self._run(self._update, mutate)

    async def delete_policy(self, tenant: str) -> bool:
        def mutate(doc: dict[str, Any]) -> tuple[bool, bool]:
            found = doc["policies"].pop(tenant, None) is not None
            return found, found

        return bool(await self._run(self._update, mutate))

    async def list_policies(self) -> dict[str, dict[str, Any]]:
        doc = await self._run(self._read)
        return copy.deepcopy(doc["policies"])

    # -- load --------------------------------------------------------------------------
    async def put_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None:
        _check_ttl(ttl_s, f"put_load({instance_id!r})")
        data = json.loads(json.dumps(load))

        def mutate(doc: dict[str, Any]) -> tuple[None, bool]:
            doc["loads"][instance_id] = {"load": data, "expires_s": time.time() + ttl_s}
            return None, True

        await self._run(self._update, mutate, False)

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        doc = await self._run(self._read)
        now = time.time()
        return {iid: copy.deepcopy(e["load"]) for iid, e in doc["loads"].items() if e["expires_s"] > now}

    # -- leases ------------------------------------------------------------------------
    async def renew_lease(self, instance_id: str, ttl_s: float, *, only_if_alive: bool = False) -> bool:
        _check_ttl(ttl_s, f"renew_lease({instance_id!r})")

        def mutate(doc: dict[str, Any]) -> tuple[bool, bool]:
            now = time.time()
            if only_if_alive and doc["leases"].get(instance_id, 0.0) <= now:
                return False, False
            doc["leases"][instance_id] = now + ttl_s
            return True, True

        return bool(await self._run(self._update, mutate, False))

    async def live_leases(self) -> set[str]:
        doc = await self._run(self._read)
        now = time.time()
        return {iid for iid, expires_s in doc["leases"].items() if expires_s > now}

    async def drop_lease(self, instance_id: str) -> None:
        def mutate(doc: dict[str, Any]) -> tuple[None, bool]:
            return None, doc["leases"].pop(instance_id, None) is not None

        await self._run(self._update, mutate, False)

    # -- changes -----------------------------------------------------------------------
    def _seq_hint(self) -> bytes:
        """The last write's sequence number from the lock file (one small read per poll)."""
        try:
            with open(self.lock_path, "rb") as fh:
                return fh.read(20)
        except FileNotFoundError:
            return b""

    def _sections(self) -> tuple[int, dict[str, Any], dict[str, Any]]:
        doc = self._read()  # seq and sections from one locked read: no change slips between
        return int(doc.get("seq", 0)), doc["instances"], doc["policies"]

    async def watch(self) -> AsyncIterator[StateChange]:
        """Poll the write sequence; on a change, report which instances/policies differ.

        Load, affinity and lease writes change the file too but are not reported: nobody
        needs to react to them.
        """
        hint = await self._run(self._seq_hint)
        _, instances, policies = await self._run(self._sections)
        # Whatever changed before this baseline was taken is unknown to the caller.
        yield StateChange("any")
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._closed.wait()
            if self._closed.is_set():
                return
            now_hint = await self._run(self._seq_hint)
            if now_hint == hint:
                continue
            hint = now_hint
            try:
                _, new_instances, new_policies = await self._run(self._sections)
            except StateStoreError as exc:
                log.error("state file unreadable while watching", extra={"error": str(exc)})
                continue
            for iid in sorted(set(instances) | set(new_instances)):
                if instances.get(iid) != new_instances.get(iid):
                    yield StateChange("instance", iid)
            for tenant in sorted(set(policies) | set(new_policies)):
                if policies.get(tenant) != new_policies.get(tenant):
                    yield StateChange("policy", tenant)
            instances, policies = new_instances, new_policies

    async def close(self) -> None:
        self._closed.set()


# ======================================================================================
# Redis backend
# ======================================================================================

# One round trip, atomic: set if absent, else return the current owner.
_CLAIM_LUA = """
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if ok then return ARGV[1] end
return redis.call('GET', KEYS[1])
"""

# Draining lives inside the instance JSON; flipping it must not race a concurrent put.
_DRAIN_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
rec['draining'] = (ARGV[2] == '1')
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return 1
"""


class RedisStateStore(StateStore):
    """Keys under `prefix`: `instances` (hash), `policies` (hash), `aff:<key>`,
    `load:<id>` and `lease:<id>` (strings with a TTL), `loads`/`leases` (index sets), and
    the pub/sub channel `changes`."""

    def __init__(self, url: str, *, prefix: str = "tokenyard:") -> None:
        import redis.asyncio as aioredis

        self._url = url
        self.prefix = prefix
        self.origin = uuid.uuid4().hex
        self._redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._drain = self._redis.register_script(_DRAIN_LUA)
        self._k_instances = prefix + "instances"
        self._k_policies = prefix + "policies"
        self._k_loads = prefix + "loads"
        self._k_leases = prefix + "leases"
        self.channel = prefix + "changes"
        self._closed = asyncio.Event()

    @property
    def url(self) -> str:
        return self._url

    async def ping(self) -> None:
        """Fail early with a clear message when Redis is not reachable."""
        try:
            await self._redis.ping()
        except Exception as exc:  # redis raises several connection error types
            raise StateStoreError(f"cannot reach Redis at {self._url}: {exc}") from exc

    async def _publish(self, kind: str, key: str) -> None:
        await self._redis.publish(
            self.channel, json.dumps({"kind": kind, "key": key, "origin": self.origin}))

    # -- instances ---------------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None:
        await self._redis.hset(self._k_instances, record.instance_id, json.dumps(record.to_dict()))
        await self._publish("instance", record.instance_id)

    async def put_instance_if_absent(self, record: InstanceRecord) -> bool:
        added = await self._redis.hsetnx(self._k_instances, record.instance_id, json.dumps(record.to_dict()))
        if added:
            await self._publish("instance", record.instance_id)
        return bool(added)

    async def remove_instance(self, instance_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._k_instances, instance_id)
            pipe.delete(self.prefix + "lease:" + instance_id)
            pipe.srem(self._k_leases, instance_id)
            removed, _, _ = await pipe.execute()
        if removed:
            await self._publish("instance", instance_id)
        return bool(removed)

    async def list_instances(self) -> list[InstanceRecord]:
        raw = await self._redis.hgetall(self._k_instances)
        return [InstanceRecord.from_dict(json.loads(v), f"redis {self._k_instances}[{k}]")
                for k, v in raw.items()]

    async def set_draining(self, instance_id: str, draining: bool) -> bool:
        found = await self._drain(keys=[self._k_instances], args=[instance_id, "1" if draining else "0"])
        if found:
            await self._publish("instance", instance_id)
        return bool(found)

    # -- affinity ----------------------------------------------------------------------
    async def get_affinity(self, key: str) -> str | None:
        owner = await self._redis.get(self.prefix + "aff:" + key)
        return str(owner) if owner is not None else None

    async def claim_affinity(self, key: str, instance_id: str, ttl_s: float) -> str:
        _check_ttl(ttl_s, f"claim_affinity({key!r})")
        ttl_ms = max(1, int(ttl_s * 1000))
        owner = await self._claim(keys=[self.prefix + "aff:" + key], args=[instance_id, ttl_ms])
        return str(owner)

    async def drop_affinity(self, key: str) -> None:
        await self._redis.delete(self.prefix + "aff:" + key)

    # -- policies ----------------------------------------------------------------------
    async def get_policy(self, tenant: str) -> dict[str, Any] | None:
        raw = await self._redis.hget(self._k_policies, tenant)
        return json.loads(raw) if raw is not None else None

    async def put_policy(self, tenant: str, policy: dict[str, Any]) -> None:
        if not tenant:
            raise ValueError("put_policy: tenant must be a non-empty string")
        await self._redis.hset(self._k_policies, tenant, json.dumps(policy))
        await self._publish("policy", tenant)

    async def delete_policy(self, tenant: str) -> bool:
        removed = await self._redis.hdel(self._k_policies, tenant)
        if removed:
            await self._publish("policy", tenant)
        return bool(removed)

    async def list_policies(self) -> dict[str, dict[str, Any]]:
        raw = await self._redis.hgetall(self._k_policies)
        return {tenant: json.loads(v) for tenant, v in raw.items()}

    # -- load --------------------------------------------------------------------------
    async def put_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None:
        _check_ttl(ttl_s, f"put_load({instance_id!r})")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.prefix + "load:" + instance_id, json.dumps(load), px=max(1, int(ttl_s * 1000)))
            pipe.sadd(self._k_loads, instance_id)
            await pipe.execute()

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        ids = sorted(await self._redis.smembers(self._k_loads))
        if not ids:
            return {}
        values = await self._redis.mget([self.prefix + "load:" + iid for iid in ids])
        expired = [iid for iid, v in zip(ids, values, strict=True) if v is None]
        if expired:
            await self._redis.srem(self._k_loads, *expired)
        return {iid: json.loads(v) for iid, v in zip(ids, values, strict=True) if v is not None}

    # -- leases ------------------------------------------------------------------------
    async def renew_lease(self, instance_id: str, ttl_s: float, *, only_if_alive: bool = False) -> bool:
        _check_ttl(ttl_s, f"renew_lease({instance_id!r})")
        ttl_ms = max(1, int(ttl_s * 1000))
        if only_if_alive:  # SET XX: only an existing (unexpired) key is renewed
            return bool(await self._redis.set(self.prefix + "lease:" + instance_id, "1", px=ttl_ms, xx=True))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.prefix + "lease:" + instance_id, "1", px=ttl_ms)
            pipe.sadd(self._k_leases, instance_id)
            await pipe.execute()
        return True

    async def live_leases(self) -> set[str]:
        ids = sorted(await self._redis.smembers(self._k_leases))
        if not ids:
            return set()
        values = await self._redis.mget([self.prefix + "lease:" + iid for iid in ids])
        expired = [iid for iid, v in zip(ids, values, strict=True) if v is None]
        if expired:
            await self._redis.srem(self._k_leases, *expired)
        return {iid for iid, v in zip(ids, values, strict=True) if v is not None}

    async def drop_lease(self, instance_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.prefix + "lease:" + instance_id)
            pipe.srem(self._k_leases, instance_id)
            await pipe.execute()

    # -- changes -----------------------------------------------------------------------
    async def watch(self) -> AsyncIterator[StateChange]:
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self.channel)
        # Changes published before the subscription took effect are lost to the caller.
        yield StateChange("any")
        try:
            while not self._closed.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    body = json.loads(message["data"])
                    change = StateChange(str(body["kind"]), str(body.get("key", "")),
                                         str(body.get("origin", "")))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignored a malformed change notice",
                                extra={"channel": self.channel, "data": str(message.get("data"))[:200]})
                    continue
                yield change
        finally:
            with contextlib.suppress(Exception):
                await pubsub.unsubscribe(self.channel)
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def delete_all(self) -> None:
        """Remove every key under the prefix (tests and `tokenyard` reset tooling)."""
        async for key in self._redis.scan_iter(match=self.prefix + "*"):
            await self._redis.delete(key)

    async def close(self) -> None:
        self._closed.set()
        await self._redis.aclose()


# ======================================================================================


def open_store(url: str) -> StateStore:
    """`file:///abs/path/state.json` or `redis://host:port/db?prefix=tokenyard:`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StateStoreError(f"state store URL {url!r}: expected file:///absolute/path.json "
                                  f"(three slashes), got host {parsed.netloc!r}")
        path = unquote(parsed.path)
        if not path or path.endswith("/"):
            raise StateStoreError(f"state store URL {url!r}: expected a file path, e.g. "
                                  "file:///var/lib/tokenyard/state.json")
        return FileStateStore(path)
    if parsed.scheme in ("redis", "rediss", "unix"):
        query = parse_qs(parsed.query)
        prefix = query.pop("prefix", ["tokenyard:"])[-1]
        rest = "&".join(f"{k}={v}" for k, values in query.items() for v in values)
        base = parsed._replace(query=rest).geturl()
        return RedisStateStore(base, prefix=prefix)
    raise StateStoreError(f"state store URL {url!r}: expected file:///abs/path.json or "
                          "redis://host:port/db[?prefix=...]")
