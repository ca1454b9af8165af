"""Versioned tenant SLO policies in the state store: schema, diff, compare-and-set history.

A tenant's SLO policy is a small document (YAML on the CLI side, JSON in the store and
on the wire):

    name: acme                    # the tenant
    spec:
      slo_class: interactive      # one of the router's policy document slo_classes
      ttft: {ms: 800, percentile: 90}
      tpot: {ms: 80, percentile: 90}
      priority: 0                 # engine priority (lower runs earlier); unset: the class's
      profile: headroom           # a dispatch profile of the policy document; unset: selection
      rate_limits: {requests_per_minute: 600, tokens_per_minute: 200000, max_concurrent: 32}

Every change appends a version (1, 2, 3, ...) holding who, when, why (a required reason)
and the diff against the version before; a delete is a version without a spec, a rollback
a new version equal to an old one. `commit` is a compare-and-set on the current version:
SQLite in one `BEGIN IMMEDIATE` transaction, Redis in one Lua script (the list length is
the version), so of two writers that read the same version exactly one wins and the other
gets `VersionConflict` naming the current version. The current spec is mirrored into the
store's plain `policies` table/hash (the form `router.app.Router.apply_policies` reads) in
the same transaction, and the usual "policy" change notice goes out with it.

Validation is structural (`parse_spec`: pydantic, unknown keys refused with the allowed
ones) plus references (`check_references`: SLO class and profile names must exist in the
router's policy document); errors name the key path.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import random
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from router.state import FileStateStore, RedisStateStore, StateStore, StateStoreError
from scheduler.dispatch import format_validation_error

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
MAX_REASON_CHARS = 1000
MAX_HISTORY = 1000  # versions one History call returns at most
_COMMIT_RETRIES = 50  # unconditional writes retry a lost race this often (with a jittered pause)


class PolicySpecError(ValueError):
    """The policy is invalid; the message is one line naming the key path."""


class VersionConflict(RuntimeError):
    """The policy changed since the version the writer read."""

    def __init__(self, name: str, expected: int, current: int) -> None:
        super().__init__(f"policy {name!r} is at version {current}, not {expected}: someone changed it since "
                         f"you read it; re-read it (tokenyard policy get {name}) and apply again")
        self.name, self.expected, self.current = name, expected, current


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """A latency target: `percentile` of requests within `ms`."""

    ms: float = Field(gt=0, le=3_600_000)
    percentile: float = Field(default=90.0, gt=0, le=100)


class RateLimits(_Strict):
    """Per-tenant limits (unset: unlimited)."""

    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12)
    max_concurrent: int | None = Field(default=None, ge=1, le=10**6)


class TenantPolicySpec(_Strict):
    """How one tenant's requests are served."""

    slo_class: str = "default"
    ttft: Target | None = None
    tpot: Target | None = None
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    profile: str | None = None
    rate_limits: RateLimits = Field(default_factory=RateLimits)


def check_name(name: Any, where: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PolicySpecError(f"{where}: expected a tenant name of letters, digits, '.', '_' or '-' "
                              f"(at most 253 characters, starting with a letter or digit), got {name!r}")
    return name


def parse_spec(raw: Any, where: str = "spec") -> TenantPolicySpec:
    if not isinstance(raw, Mapping):
        raise PolicySpecError(f"{where}: expected a mapping (the policy spec), got {type(raw).__name__}")
    try:
        return TenantPolicySpec.model_validate(dict(raw))
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        allowed = None
        if first["type"] == "extra_forbidden":
            sections: dict[str, type[BaseModel]] = {"rate_limits": RateLimits, "ttft": Target, "tpot": Target}
            section = sections.get(str(first["loc"][0]), TenantPolicySpec) if len(first["loc"]) > 1 \
                else TenantPolicySpec
            allowed = list(section.model_fields)
        raise PolicySpecError(format_validation_error(exc, where, allowed)) from None


def check_references(spec: TenantPolicySpec, slo_classes: Collection[str] | None,
                     profiles: Collection[str] | None, where: str = "spec") -> None:
    """Names the router's policy document must know (None: not checked)."""
    if slo_classes is not None and spec.slo_class not in slo_classes:
        raise PolicySpecError(f"{where}.slo_class: unknown SLO class {spec.slo_class!r}; known: "
                              f"{', '.join(sorted(slo_classes))}")
    if profiles is not None and spec.profile is not None and spec.profile not in profiles:
        raise PolicySpecError(f"{where}.profile: unknown dispatch profile {spec.profile!r}; known: "
                              f"{', '.join(sorted(profiles))}")


def parse_document(raw: Any, where: str) -> tuple[str, TenantPolicySpec]:
    """`{name, spec}` (optionally `kind: SloPolicy`) as the CLI reads it from a file."""
    if not isinstance(raw, Mapping):
        raise PolicySpecError(f"{where}: expected a mapping {{name, spec}}, got {type(raw).__name__}")
    # `metadata` (version, author, ...) is what `tokenyard policy get -o yaml` adds; it is
    # ignored, so that output applies back as it is.
    unknown = sorted(set(raw) - {"kind", "name", "spec", "metadata"})
    if unknown:
        raise PolicySpecError(f"{where}: unknown key {unknown[0]!r}; allowed: kind, name, spec, metadata")
    if raw.get("kind", "SloPolicy") != "SloPolicy":
        raise PolicySpecError(f"{where}.kind: expected 'SloPolicy', got {raw.get('kind')!r}")
    if "name" not in raw:
        raise PolicySpecError(f"{where}.name: required (the tenant the policy is for)")
    return check_name(raw["name"], f"{where}.name"), parse_spec(raw.get("spec", {}), f"{where}.spec")


def spec_dict(spec: TenantPolicySpec) -> dict[str, Any]:
    """The stored form: only what was set (a person's diff shows what they wrote)."""
    return spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


def spec_yaml(spec: Mapping[str, Any] | None) -> str:
    return "" if spec is None else yaml.safe_dump(dict(spec), sort_keys=True, default_flow_style=False)


def diff_specs(name: str, old: PolicyVersion | None, new: Mapping[str, Any] | None, new_label: str) -> str:
    """Unified diff of two specs' YAML ("" when equal)."""
    old_text = spec_yaml(old.spec if old is not None else None)
    old_label = f"{name}@v{old.version}" if old is not None else f"{name}@none"
    lines = difflib.unified_diff(old_text.splitlines(keepends=True), spec_yaml(new).splitlines(keepends=True),
                                 old_label, new_label)
    return "".join(lines)


def legacy_form(name: str, spec: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The plain policy the router's tenant table reads (router/admin_grpc.py `policy_to_dict`)."""
    parsed = TenantPolicySpec.model_validate(dict(spec))
    out: dict[str, Any] = {"tenant": name, "slo_class": parsed.slo_class,
                           "ttft_slo_ms": parsed.ttft.ms if parsed.ttft else 0.0,
                           "tpot_slo_ms": parsed.tpot.ms if parsed.tpot else 0.0,
                           "dispatch_policy": parsed.profile or "", "version": version,
                           "rate_limits": parsed.rate_limits.model_dump(exclude_none=True)}
    if parsed.priority is not None:  # absent: the SLO class's priority applies
        out["priority"] = parsed.priority
    return out


def stored_policy_problems(doc: Mapping[str, Any], slo_classes: Collection[str],
                           profiles: Collection[str]) -> list[str]:
    """Why a stored (mirrored) policy cannot be applied by a router with these names: one
    written around the Admin service's validation, or by a router with another config."""
    problems = []
    if doc.get("slo_class") and doc["slo_class"] not in slo_classes:
        problems.append(f"slo_class {doc['slo_class']!r} is not one of {sorted(slo_classes)}")
    if doc.get("dispatch_policy") and doc["dispatch_policy"] not in profiles:
        problems.append(f"dispatch_policy {doc['dispatch_policy']!r} is not one of {sorted(profiles)}")
    return problems


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One version of a tenant's policy; `spec` None means the policy was deleted."""

    name: str
    version: int
    spec: dict[str, Any] | None
    author: str
    created_unix_ms: int
    reason: str
    diff: str

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "version": self.version, "spec": self.spec, "author": self.author,
                           "created_unix_ms": self.created_unix_ms, "reason": self.reason, "diff": self.diff},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PolicyVersion:
        raw = json.loads(text)
        return cls(str(raw["name"]), int(raw["version"]), raw.get("spec"), str(raw.get("author", "")),
                   int(raw.get("created_unix_ms", 0)), str(raw.get("reason", "")), str(raw.get("diff", "")))


# ======================================================================================
# Backends
# ======================================================================================

_SQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_versions (name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
                                            PRIMARY KEY (name, version));
"""


class _SqliteVersions:
    """On the embedded store's SQLite file (its connection and its one thread)."""

    def __init__(self, store: FileStateStore) -> None:
        self.store = store
        self._ready = False

    async def _call(self, fn: Any, *args: Any) -> Any:
        if not self._ready:
            await self.store._run(self.store._db.executescript, _SQL_SCHEMA)
            self._ready = True
        return await self.store._run(fn, *args)

    def _current_sync(self, name: str) -> str | None:
        row = self.store._db.execute(
            "SELECT doc FROM policy_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        return None if row is None else str(row[0])

    async def current(self, name: str) -> PolicyVersion | None:
        doc = await self._call(self._current_sync, name)
        return None if doc is None else PolicyVersion.from_json(doc)

    async def get(self, name: str, version: int) -> PolicyVersion | None:
        rows = await self._call(self.store._all, "SELECT doc FROM policy_versions WHERE name = ? AND version = ?",
                                (name, version))
        return PolicyVersion.from_json(rows[0][0]) if rows else None

    async def history(self, name: str, limit: int) -> list[PolicyVersion]:
        rows = await self._call(self.store._all, "SELECT doc FROM policy_versions WHERE name = ? "
                                "ORDER BY version DESC LIMIT ?", (name, limit))
        return [PolicyVersion.from_json(r[0]) for r in reversed(rows)]

    async def names(self) -> list[str]:
        rows = await self._call(self.store._all, "SELECT DISTINCT name FROM policy_versions ORDER BY name")
        return [str(r[0]) for r in rows]

    def _cas_sync(self, entry: PolicyVersion, legacy: dict[str, Any] | None) -> tuple[bool, int]:
        db = self.store._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM policy_versions WHERE name = ?",
                             (entry.name,)).fetchone()
            current = int(row[0])
            if current != entry.version - 1:
                db.execute("ROLLBACK")
                return False, current
            db.execute("INSERT INTO policy_versions (name, version, doc) VALUES (?, ?, ?)",
                       (entry.name, entry.version, entry.to_json()))
            if legacy is None:
                db.execute("DELETE FROM policies WHERE tenant = ?", (entry.name,))
            else:
                db.execute("INSERT INTO policies (tenant, doc) VALUES (?, ?) ON CONFLICT (tenant) DO UPDATE SET "
                           "doc = excluded.doc", (entry.name, json.dumps(legacy)))
            db.execute("INSERT INTO changes (kind, key, origin) VALUES ('policy', ?, ?)", (entry.name, self.store.origin))
            db.execute("COMMIT")
            return True, entry.version
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def cas(self, entry: PolicyVersion, legacy: dict[str, Any] | None) -> tuple[bool, int]:
        """Append `entry` if the current version is `entry.version - 1`; returns whether it
        was appended and the version now current."""
        appended, now = await self._call(self._cas_sync, entry, legacy)
        return bool(appended), int(now)


# KEYS: versions list, policies hash, names set. ARGV: base version, entry JSON, tenant,
# legacy JSON ('' deletes), channel, change notice. The list's length is the version.
_CAS_LUA = """
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[1]) then return {0, n} end
redis.call('RPUSH', KEYS[1], ARGV[2])
if ARGV[4] == '' then redis.call('HDEL', KEYS[2], ARGV[3]) else redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, n + 1}
"""


class _RedisVersions:
    """Keys under the store's prefix: `policyv:<name>` (list of versions), `policy_names` (set)."""

    def __init__(self, store: RedisStateStore) -> None:
        self.store = store
        self.redis = store._redis
        self._cas = self.redis.register_script(_CAS_LUA)
        self._k_names = store.prefix + "policy_names"

    def _key(self, name: str) -> str:
        return f"{self.store.prefix}policyv:{name}"

    async def current(self, name: str) -> PolicyVersion | None:
        raw = await self.redis.lindex(self._key(name), -1)
        return None if raw is None else PolicyVersion.from_json(raw)

    async def get(self, name: str, version: int) -> PolicyVersion | None:
        raw = await self.redis.lindex(self._key(name), version - 1) if version >= 1 else None
        return None if raw is None else PolicyVersion.from_json(raw)

    async def history(self, name: str, limit: int) -> list[PolicyVersion]:
        return [PolicyVersion.from_json(r) for r in await self.redis.lrange(self._key(name), -limit, -1)]

    async def names(self) -> list[str]:
        return sorted(str(n) for n in await self.redis.smembers(self._k_names))

    async def cas(self, entry: PolicyVersion, legacy: dict[str, Any] | None) -> tuple[bool, int]:
        notice = json.dumps({"kind": "policy", "key": entry.name, "origin": self.store.origin})
        result = await self._cas(
            keys=[self._key(entry.name), self.store._k_policies, self._k_names],
            args=[entry.version - 1, entry.to_json(), entry.name, json.dumps(legacy) if legacy is not None else "",
                  self.store.channel, notice])
        return bool(int(result[0])), int(result[1])


Backend = _SqliteVersions | _RedisVersions


class PolicyVersions:
    """The versioned policies of one store (either backend)."""

    def __init__(self, store: StateStore) -> None:
        if isinstance(store, FileStateStore):
            self.backend: Backend = _SqliteVersions(store)
        elif isinstance(store, RedisStateStore):
            self.backend = _RedisVersions(store)
        else:
            raise StateStoreError(f"versioned policies need the file or Redis store, got {type(store).__name__}")

    async def current(self, name: str) -> PolicyVersion | None:
        return await self.backend.current(name)

    async def get(self, name: str, version: int) -> PolicyVersion | None:
        return await self.backend.get(name, version)

    async def history(self, name: str, limit: int = 20) -> list[PolicyVersion]:
        return await self.backend.history(name, max(1, min(limit, MAX_HISTORY)))

    async def list_current(self) -> list[PolicyVersion]:
        """Every tenant's current version that is not a deletion, ordered by name."""
        out = []
        for name in await self.backend.names():
            found = await self.backend.current(name)
            if found is not None and found.spec is not None:
                out.append(found)
        return out

    async def commit(self, name: str, spec: Mapping[str, Any] | None, *, expected_version: int | None,
                     author: str, reason: str) -> tuple[PolicyVersion, bool]:
        """Append a version with `spec` (None: delete). With `expected_version`, only if the
        current version is that one (0: the policy has no version yet), else
        `VersionConflict`. Returns (the version now current, whether one was appended):
        a spec equal to the current one appends nothing."""
        check_name(name)
        if not reason.strip():
            raise PolicySpecError("reason: required (say why the policy changes; it is kept in the history)")
        if len(reason) > MAX_REASON_CHARS:
            raise PolicySpecError(f"reason: at most {MAX_REASON_CHARS} characters, got {len(reason)}")
        for attempt in range(_COMMIT_RETRIES):
            if attempt:  # lost a race: let the winner's writers finish before reading again
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            current = await self.backend.current(name)
            at = current.version if current is not None else 0
            if expected_version is not None and expected_version != at:
                raise VersionConflict(name, expected_version, at)
            new_spec = dict(spec) if spec is not None else None
            if current is not None and current.spec == new_spec:
                return current, False
            if current is None and new_spec is None:
                raise LookupError(f"policy {name!r} does not exist")
            entry = PolicyVersion(name, at + 1, new_spec, author, int(time.time() * 1000), reason,
                                  diff_specs(name, current, new_spec, f"{name}@v{at + 1}"))
            legacy = legacy_form(name, new_spec, at + 1) if new_spec is not None else None
            appended, now = await self.backend.cas(entry, legacy)
            if appended:
                return entry, True
            if expected_version is not None:
                raise VersionConflict(name, expected_version, now)
        raise VersionConflict(name, at, at + 1)
