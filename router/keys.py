"""Tenants' API keys managed at run time: created, rotated and revoked through the Admin
service, stored only as salted hashes, effective in every router replica within a second.

A key reads `ty-<key_id>.<secret>`: `key_id` (public, 12 hex digits) finds the record,
`secret` (32 random bytes, URL-safe) is checked against `HMAC-SHA256(salt, secret)` with
a per-key random salt, compared in constant time. The store never sees a secret; the
plaintext key is shown once, by the call that creates it. A record:
`{key_id, tenant, salt, digest, created_unix_ms, revoked_unix_ms}`; a revoked key stays
(for `keys list`) but never authenticates.

Storage: table `api_keys` of the SQLite file, or hash `<prefix>api_keys` in Redis; each
change sends a "keys" change notice, on which routers reload (`KeyCache`), plus a
periodic reload like the policies'. Keys in the router config (`tenants.*.api_keys`) keep
working beside these.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from router.state import FileStateStore, RedisStateStore, StateStore, StateStoreError

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^ty-([0-9a-f]{12})\.([A-Za-z0-9_-]{20,100})$")
MAX_KEYS = 100_000  # records loaded into a router at most


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    tenant: str
    salt: str
    digest: str
    created_unix_ms: int
    revoked_unix_ms: int = 0

    @property
    def revoked(self) -> bool:
        return self.revoked_unix_ms > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiKeyRecord:
        raw = json.loads(text)
        return cls(str(raw["key_id"]), str(raw["tenant"]), str(raw["salt"]), str(raw["digest"]),
                   int(raw.get("created_unix_ms", 0)), int(raw.get("revoked_unix_ms", 0)))


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode("ascii"), hashlib.sha256).hexdigest()


def new_key(tenant: str) -> tuple[str, ApiKeyRecord]:
    """(the plaintext key, shown once; the record to store)."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = ApiKeyRecord(key_id, tenant, salt, _digest(salt, secret), int(time.time() * 1000))
    return f"ty-{key_id}.{secret}", record


def key_id_of(api_key: str) -> str | None:
    found = KEY_RE.match(api_key)
    return found.group(1) if found else None


def verify(api_key: str, record: ApiKeyRecord) -> bool:
    found = KEY_RE.match(api_key)
    if found is None or found.group(1) != record.key_id or record.revoked:
        return False
    return hmac.compare_digest(_digest(record.salt, found.group(2)), record.digest)


# -- storage ------------------------------------------------------------------------------
_SQL = "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, doc TEXT NOT NULL)"


class KeyStore:
    """API key records in either backend."""

    def __init__(self, store: StateStore) -> None:
        if not isinstance(store, FileStateStore | RedisStateStore):
            raise StateStoreError(f"API keys need the file or Redis store, got {type(store).__name__}")
        self.store = store
        self._ready = False

    async def _sql(self, fn: Any, *args: Any) -> Any:
        assert isinstance(self.store, FileStateStore)
        if not self._ready:
            await self.store._run(self.store._db.execute, _SQL)
            self._ready = True
        return await self.store._run(fn, *args)

    def _put_sync(self, record: ApiKeyRecord) -> None:
        assert isinstance(self.store, FileStateStore)
        db = self.store._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO api_keys (key_id, doc) VALUES (?, ?) ON CONFLICT (key_id) DO UPDATE SET "
                       "doc = excluded.doc", (record.key_id, record.to_json()))
            db.execute("INSERT INTO changes (kind, key, origin) VALUES ('keys', ?, ?)",
                       (record.key_id, self.store.origin))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def put(self, record: ApiKeyRecord) -> None:
        if isinstance(self.store, FileStateStore):
            await self._sql(self._put_sync, record)
            return
        notice = json.dumps({"kind": "keys", "key": record.key_id, "origin": self.store.origin})
        async with self.store._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.store.prefix + "api_keys", record.key_id, record.to_json())
            pipe.publish(self.store.channel, notice)
            await pipe.execute()

    async def all(self) -> list[ApiKeyRecord]:
        if isinstance(self.store, FileStateStore):
            rows = await self._sql(self.store._all, "SELECT doc FROM api_keys LIMIT ?", (MAX_KEYS,))
            return [ApiKeyRecord.from_json(r[0]) for r in rows]
        raw = await self.store._redis.hgetall(self.store.prefix + "api_keys")
        return [ApiKeyRecord.from_json(v) for v in list(raw.values())[:MAX_KEYS]]

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        if isinstance(self.store, FileStateStore):
            rows = await self._sql(self.store._all, "SELECT doc FROM api_keys WHERE key_id = ?", (key_id,))
            return ApiKeyRecord.from_json(rows[0][0]) if rows else None
        raw = await self.store._redis.hget(self.store.prefix + "api_keys", key_id)
        return ApiKeyRecord.from_json(raw) if raw is not None else None

    async def create(self, tenant: str) -> tuple[str, ApiKeyRecord]:
        api_key, record = new_key(tenant)
        await self.put(record)
        return api_key, record

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        found = await self.get(key_id)
        if found is None:
            raise LookupError(f"API key {key_id!r} does not exist")
        if found.revoked:
            return found
        revoked = ApiKeyRecord(found.key_id, found.tenant, found.salt, found.digest, found.created_unix_ms,
                               int(time.time() * 1000))
        await self.put(revoked)
        return revoked

    async def rotate(self, key_id: str) -> tuple[str, ApiKeyRecord]:
        """A new key for the same tenant; the old one is revoked (after the new one exists)."""
        found = await self.get(key_id)
        if found is None or found.revoked:
            raise LookupError(f"API key {key_id!r} does not exist or is revoked")
        api_key, record = await self.create(found.tenant)
        await self.revoke(key_id)
        return api_key, record


class KeyCache:
    """A router's in-memory copy: key id -> record, for one dict access per request."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self._by_id: dict[str, ApiKeyRecord] = {}

    async def reload(self) -> None:
        self._by_id = {r.key_id: r for r in await self.keys.all()}

    def tenant_for(self, api_key: str) -> str | None:
        key_id = key_id_of(api_key)
        record = self._by_id.get(key_id) if key_id is not None else None
        return record.tenant if record is not None and verify(api_key, record) else None


async def sync_router_keys(router: Any) -> None:
    """Reload a router's key cache; a tenant known only from its keys gets a table entry
    (SLO class "default" until a policy says otherwise)."""
    from router.tenants import Tenant

    cache: KeyCache = router.key_cache
    await cache.reload()
    for name in sorted({r.tenant for r in cache._by_id.values() if not r.revoked}):
        if name not in router.tenants.tenants:
            router.tenants.tenants[name] = Tenant(name)
            router._tenant_defaults[name] = ("default", None)
