"""Shared router state behind one interface: instances, affinity, policies, load, leases.

Two backends implement `StateStore`:

- `FileStateStore` (`file:///abs/path/state.db`), the embedded default: one SQLite
  database in WAL mode, every operation O(1) in the number of sessions, several
  processes on one machine sharing it safely; instance and policy changes go to a change
  log that watchers poll.
- `RedisStateStore` (`redis://host:port/db?prefix=...`), for several router replicas:
  instances and policies in hashes, affinity and load as keys with a TTL, changes
  announced on a pub/sub channel.

Only membership, draining, policies and affinity claims go through the store; the
request hot path reads the in-memory `router.registry.InstanceRegistry` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

log = logging.getLogger(__name__)

SOURCES = ("static", "kubernetes", "admin")


class StateStoreError(RuntimeError):
    """The store cannot be used: bad URL, unreadable or corrupted file, Redis down."""


def store_unavailable(exc: BaseException) -> str | None:
    """The message for a failure of the store itself (ours, the OS's, or the Redis client's
    own exception types); None for any other exception."""
    if isinstance(exc, StateStoreError | OSError | ConnectionError) or type(exc).__module__.startswith("redis"):
        return f"state store unavailable: {exc}"
    return None


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
    # An operator's cordon (no new requests; see `tokenyard instances cordon`): who, when
    # and why, `{"by", "at_unix_ms", "reason"}`; None when not cordoned.
    cordon: dict[str, Any] | None = None

    @property
    def cordoned(self) -> bool:
        return self.cordon is not None

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
            cordon=_cordon_of(raw.get("cordon"), f"{where}.cordon"),
        )


def cordon_note(by: str, reason: str, at_unix_ms: int | None = None) -> dict[str, Any]:
    """The audit of a cordon: who, when (ms since the epoch), why."""
    return {"by": by, "at_unix_ms": int(time.time() * 1000) if at_unix_ms is None else at_unix_ms,
            "reason": reason}


def _cordon_of(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("by", ""), str) \
            or not isinstance(raw.get("reason", ""), str) or not isinstance(raw.get("at_unix_ms", 0), int):
        raise ValueError(f"{where}: expected {{by: str, at_unix_ms: int, reason: str}} or null, got {raw!r}")
    return cordon_note(str(raw.get("by", "")), str(raw.get("reason", "")), int(raw.get("at_unix_ms", 0)))


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

    @abstractmethod
    async def set_cordon(self, instance_id: str, cordon: dict[str, Any] | None) -> bool:
        """Set (a `cordon_note`) or clear (None) an instance's cordon, atomically against
        concurrent puts; False when the instance is unknown."""

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


def _text(value: bytes | str) -> str:
    """A Redis reply as str. The client decodes replies (decode_responses=True), but
    redis-py types them `bytes | str`; this narrows without changing a str."""
    return value.decode() if isinstance(value, bytes) else value


# ======================================================================================
# File backend: SQLite in WAL mode
# ======================================================================================

_DB_FORMAT = "tokenyard-state/2"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (tenant TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS affinity (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS affinity_expiry ON affinity (expires_s);
CREATE TABLE IF NOT EXISTS loads (id TEXT PRIMARY KEY, doc TEXT NOT NULL, expires_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, expires_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                                    key TEXT NOT NULL, origin TEXT NOT NULL);
"""
_SWEEP_EVERY_CLAIMS = 1024  # expired affinity rows are deleted once per this many claims
_CHANGES_KEPT = 10_000  # change-log rows kept for watchers (older ones are trimmed)
WATCH_FORCED_READ_S = 5.0  # a watcher reads the change log at least this often (see FileStateStore.watch)


def _enter_wal(db: sqlite3.Connection, timeout_s: float = 10.0) -> None:
    """Switch to WAL, waiting for other processes that open the same new file.

    SQLite answers "database is locked" at once, without calling its busy handler, when
    two connections change the journal mode of a new database together (two router
    processes starting on one state file); so this one statement is retried, for as long
    as the busy timeout would have waited."""
    deadline = time.monotonic() + timeout_s
    delay_s = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.1)


class FileStateStore(StateStore):
    """The embedded default: one SQLite database on local disk, in WAL mode.

    Why SQLite: the JSON document this replaced rewrote the whole file per affinity
    claim, so 3,000 sessions took request latency from ~50 ms to 1.9-2.7 s. Here every
    operation touches its own rows through a primary key: measured by
    bench/state_sessions.py (docs/benchmarks.md, "Embedded state store: sessions"), a
    claim costs the same at 1k and at 100k sessions. An append-only log with compaction
    was the alternative; it would need its own cross-process locking, compaction and
    index rebuild on open, all of which SQLite (in the standard library) already has.

    Several processes on one machine share the file safely (SQLite's locking; WAL lets
    readers run beside a writer, `busy_timeout` makes writers queue instead of failing).
    Every change of an instance or a policy also appends a row to `changes`, which
    `watch()` polls. Blocking calls run on one thread per store, off the event loop.
    Expiring entries store a wall-clock deadline (processes must agree on it).
    """

    def __init__(self, path: str | Path, *, poll_interval_s: float = 0.2) -> None:
        import concurrent.futures

        self.path = Path(path)
        if not self.path.is_absolute():
            raise StateStoreError(f"state file path must be absolute, got {str(path)!r}")
        self.poll_interval_s = poll_interval_s
        self._wal_path = Path(f"{self.path}-wal")  # SQLite's name for the WAL beside the file
        self.origin = uuid.uuid4().hex
        self._closed = asyncio.Event()
        self._claims = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenyard-state")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateStoreError(f"cannot create the folder of state file {self.path}: {exc}") from exc
        self._db = self._open()  # fail at open time on a corrupted file, not on first use

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    # -- the database ------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        self._check_not_foreign()
        try:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 10000")
            _enter_wal(db)
            # NORMAL in WAL mode: a power cut may lose the last commits, never consistency.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA cache_size = -16384")  # 16 MiB of pages: 100k sessions stay in memory
            db.executescript(_SCHEMA)
            found = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if found is None:
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (_DB_FORMAT,))
            elif found[0] != _DB_FORMAT:
                db.close()
                raise StateFileCorrupt(f"state file {self.path} is a {found[0]!r} database, expected "
                                       f"{_DB_FORMAT}; fix or remove it (it is never reset automatically)")
        except sqlite3.DatabaseError as exc:
            raise StateFileCorrupt(f"state file {self.path} is not a usable SQLite database ({exc}); fix or "
                                   "remove it (it is never reset automatically)") from exc
        return db

    def _check_not_foreign(self) -> None:
        """A file that is not SQLite (an old JSON state document, anything else) is kept
        as it is and reported, never overwritten."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(16)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateStoreError(f"cannot read state file {self.path}: {exc}") from exc
        if head and head != b"SQLite format 3\x00":
            kind = ("a JSON state document of an older Tokenyard (format tokenyard-state/1)"
                    if head.lstrip().startswith((b"{", b"[")) else "not a SQLite database")
            raise StateFileCorrupt(f"state file {self.path} is {kind}; expected a {_DB_FORMAT} SQLite database. "
                                   "Move it away or point store: at another path (it is never reset "
                                   "automatically)")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed.is_set():
            raise StateStoreError(f"state store {self.url} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O error
            raise StateStoreError(f"state file {self.path}: {exc}") from exc

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]], change: tuple[str, str] | None = None) -> int:
        """Run statements in one immediate transaction; returns the last rowcount."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            count = 0
            for sql, params in statements:
                count = db.execute(sql, params).rowcount
            if change is not None and count:
                db.execute("INSERT INTO changes (kind, key, origin) VALUES (?, ?, ?)", (*change, self.origin))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return count

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()

    # -- instances ---------------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None:
        doc = json.dumps(record.to_dict(), sort_keys=True)
        await self._run(self._write, [(
            "INSERT INTO instances (id, doc) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET doc = excluded.doc "
            "WHERE instances.doc != excluded.doc", (record.instance_id, doc))], ("instance", record.instance_id))

    async def put_instance_if_absent(self, record: InstanceRecord) -> bool:
        doc = json.dumps(record.to_dict(), sort_keys=True)
        added = await self._run(self._write, [("INSERT OR IGNORE INTO instances (id, doc) VALUES (?, ?)",
                                               (record.instance_id, doc))], ("instance", record.instance_id))
        return bool(added)

    async def remove_instance(self, instance_id: str) -> bool:
        removed = await self._run(self._write, [("DELETE FROM leases WHERE id = ?", (instance_id,)),
                                                ("DELETE FROM instances WHERE id = ?", (instance_id,))],
                                  ("instance", instance_id))
        return bool(removed)

    async def list_instances(self) -> list[InstanceRecord]:
        rows = await self._run(self._all, "SELECT id, doc FROM instances ORDER BY id")
        return [InstanceRecord.from_dict(json.loads(doc), f"{self.path}: instances.{iid}") for iid, doc in rows]

    async def set_draining(self, instance_id: str, draining: bool) -> bool:
        return await self._set_field(instance_id, "draining", draining)

    async def set_cordon(self, instance_id: str, cordon: dict[str, Any] | None) -> bool:
        return await self._set_field(instance_id, "cordon", cordon)

    async def _set_field(self, instance_id: str, key: str, value: Any) -> bool:
        """One field of an instance's JSON, read and written in one transaction."""
        def flip() -> bool:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT doc FROM instances WHERE id = ?", (instance_id,)).fetchone()
                if row is None:
                    db.execute("ROLLBACK")
                    return False
                doc = json.loads(row[0])
                if doc.get(key) != value:
                    doc[key] = value
                    db.execute("UPDATE instances SET doc = ? WHERE id = ?", (json.dumps(doc, sort_keys=True),
                                                                             instance_id))
                    db.execute("INSERT INTO changes (kind, key, origin) VALUES ('instance', ?, ?)",
                               (instance_id, self.origin))
                db.execute("COMMIT")
                return True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return bool(await self._run(flip))

    # -- affinity ----------------------------------------------------------------------
    async def get_affinity(self, key: str) -> str | None:
        rows = await self._run(self._all, "SELECT owner FROM affinity WHERE key = ? AND expires_s > ?",
                               (key, time.time()))
        return str(rows[0][0]) if rows else None

    async def claim_affinity(self, key: str, instance_id: str, ttl_s: float) -> str:
        _check_ttl(ttl_s, f"claim_affinity({key!r})")
        self._claims += 1
        sweep = self._claims % _SWEEP_EVERY_CLAIMS == 0

        def claim() -> str:
            now = time.time()
            db = self._db
            # One statement: atomic across processes. The row is (re)written only when
            # it is absent or expired; otherwise the live owner stays and is read back.
            row = db.execute(
                "INSERT INTO affinity (key, owner, expires_s) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "owner = excluded.owner, expires_s = excluded.expires_s WHERE affinity.expires_s <= ? "
                "RETURNING owner", (key, instance_id, now + ttl_s, now)).fetchone()
            if row is None:
                row = db.execute("SELECT owner FROM affinity WHERE key = ?", (key,)).fetchone()
            if sweep:  # amortised O(1): expired sessions go in one indexed delete
                db.execute("DELETE FROM affinity WHERE expires_s <= ?", (now,))
            return str(row[0]) if row is not None else instance_id

        return str(await self._run(claim))

    async def drop_affinity(self, key: str) -> None:
        await self._run(self._write, [("DELETE FROM affinity WHERE key = ?", (key,))])

    async def affinity_count(self) -> int:
        """Live affinity entries (for benchmarks and operators)."""
        rows = await self._run(self._all, "SELECT COUNT(*) FROM affinity WHERE expires_s > ?", (time.time(),))
        return int(rows[0][0])

    # -- policies ----------------------------------------------------------------------
    async def get_policy(self, tenant: str) -> dict[str, Any] | None:
        rows = await self._run(self._all, "SELECT doc FROM policies WHERE tenant = ?", (tenant,))
        return json.loads(rows[0][0]) if rows else None

    async def put_policy(self, tenant: str, policy: dict[str, Any]) -> None:
        if not tenant:
            raise ValueError("put_policy: tenant must be a non-empty string")
        doc = json.dumps(policy, sort_keys=True)  # only JSON values are stored; fail early
        await self._run(self._write, [(
            "INSERT INTO policies (tenant, doc) VALUES (?, ?) ON CONFLICT (tenant) DO UPDATE SET doc = excluded.doc "
            "WHERE policies.doc != excluded.doc", (tenant, doc))], ("policy", tenant))

    async def delete_policy(self, tenant: str) -> bool:
        return bool(await self._run(self._write, [("DELETE FROM policies WHERE tenant = ?", (tenant,))],
                                    ("policy", tenant)))

    async def list_policies(self) -> dict[str, dict[str, Any]]:
        rows = await self._run(self._all, "SELECT tenant, doc FROM policies")
        return {tenant: json.loads(doc) for tenant, doc in rows}

    # -- load --------------------------------------------------------------------------
    async def put_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None:
        _check_ttl(ttl_s, f"put_load({instance_id!r})")
        doc = json.dumps(load)
        await self._run(self._write, [(
            "INSERT INTO loads (id, doc, expires_s) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "doc = excluded.doc, expires_s = excluded.expires_s", (instance_id, doc, time.time() + ttl_s))])

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        rows = await self._run(self._all, "SELECT id, doc FROM loads WHERE expires_s > ?", (time.time(),))
        return {iid: json.loads(doc) for iid, doc in rows}

    # -- leases ------------------------------------------------------------------------
    async def renew_lease(self, instance_id: str, ttl_s: float, *, only_if_alive: bool = False) -> bool:
        _check_ttl(ttl_s, f"renew_lease({instance_id!r})")
        now = time.time()
        if only_if_alive:
            done = await self._run(self._write, [("UPDATE leases SET expires_s = ? WHERE id = ? AND expires_s > ?",
                                                  (now + ttl_s, instance_id, now))])
            return bool(done)
        await self._run(self._write, [(
            "INSERT INTO leases (id, expires_s) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET "
            "expires_s = excluded.expires_s", (instance_id, now + ttl_s))])
        return True

    async def live_leases(self) -> set[str]:
        rows = await self._run(self._all, "SELECT id FROM leases WHERE expires_s > ?", (time.time(),))
        return {str(row[0]) for row in rows}

    async def drop_lease(self, instance_id: str) -> None:
        await self._run(self._write, [("DELETE FROM leases WHERE id = ?", (instance_id,))])

    # -- changes -----------------------------------------------------------------------
    def _changes_since(self, seq: int) -> list[tuple[int, str, str, str]]:
        rows = self._db.execute("SELECT seq, kind, key, origin FROM changes WHERE seq > ? ORDER BY seq LIMIT 1000",
                                (seq,)).fetchall()
        if rows and rows[-1][0] % 1000 == 0:  # now and then, the log is trimmed
            self._db.execute("DELETE FROM changes WHERE seq <= ?", (rows[-1][0] - _CHANGES_KEPT,))
        return rows

    def _last_seq(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(row[0])

    def _file_stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """What a commit by any process changes: the WAL's (and, on a checkpoint, the
        database's) inode, size and modification time. One stat() each, on the loop."""
        stamp: list[tuple[int, int, int] | None] = []
        for path in (self._wal_path, self.path):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
                continue
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamp)

    async def watch(self) -> AsyncIterator[StateChange]:
        """Poll the change log every `poll_interval_s`: instance and policy changes by any
        process on this file. Load, affinity and lease writes are not reported: nobody
        needs to react to them.

        A poll reads the change log (a hop to the store's thread) only when the file's
        stamp moved since the last read, or every WATCH_FORCED_READ_S regardless (a file
        time is as coarse as the kernel's tick, so two commits in one tick, the second
        over a just-reset WAL of the same size, could hide from the stamp). The hop was
        ~8% of the router's samples under load on the 2-core box: the thread and the
        event loop hand the GIL back and forth (py-spy, issue #17, docs/benchmarks.md)."""
        stamp = self._file_stamp()  # before the read: a commit after it shows in the next stamp
        seq = await self._run(self._last_seq)
        # Whatever changed before this baseline was taken is unknown to the caller.
        yield StateChange("any")
        forced_every = max(1, round(WATCH_FORCED_READ_S / self.poll_interval_s))
        unread = 0
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._closed.wait()
            if self._closed.is_set():
                return
            now_stamp = self._file_stamp()
            unread += 1
            if now_stamp == stamp and unread < forced_every:
                continue
            stamp, unread = now_stamp, 0
            try:
                rows = await self._run(self._changes_since, seq)
            except StateStoreError as exc:
                log.error("state file unreadable while watching", extra={"error": str(exc)})
                continue
            for row_seq, kind, key, origin in rows:
                seq = row_seq
                yield StateChange(kind, key, origin)

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=False)


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

# The cordon too (ARGV[2]: its JSON, or "null" to clear it).
_CORDON_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
rec['cordon'] = cjson.decode(ARGV[2])
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
        self._cordon = self._redis.register_script(_CORDON_LUA)
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
        return [InstanceRecord.from_dict(json.loads(v), f"redis {self._k_instances}[{_text(k)}]")
                for k, v in raw.items()]

    async def set_draining(self, instance_id: str, draining: bool) -> bool:
        found = await self._drain(keys=[self._k_instances], args=[instance_id, "1" if draining else "0"])
        if found:
            await self._publish("instance", instance_id)
        return bool(found)

    async def set_cordon(self, instance_id: str, cordon: dict[str, Any] | None) -> bool:
        found = await self._cordon(keys=[self._k_instances], args=[instance_id, json.dumps(cordon)])
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
        return {_text(tenant): json.loads(v) for tenant, v in raw.items()}

    # -- load --------------------------------------------------------------------------
    async def put_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None:
        _check_ttl(ttl_s, f"put_load({instance_id!r})")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.prefix + "load:" + instance_id, json.dumps(load), px=max(1, int(ttl_s * 1000)))
            pipe.sadd(self._k_loads, instance_id)
            await pipe.execute()

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        ids = sorted(_text(iid) for iid in await self._redis.smembers(self._k_loads))
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
        ids = sorted(_text(iid) for iid in await self._redis.smembers(self._k_leases))
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
                # redis-py before 8 leaves PubSub.aclose unannotated, 8.x annotates it: a typed
                # reference type-checks against both (an ignore comment is unused on one of them).
                close: Callable[[], Awaitable[None]] = pubsub.aclose
                await close()

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
