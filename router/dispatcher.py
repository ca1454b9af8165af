"""Live dispatch: a request's RequestInfo, its tenant's profile, and session affinity.

Every decision is the scheduler's `DecisionLayer` (scheduler/layer.py), built from the
config's policy document: the very objects, window and selection the simulator drives.
This module only feeds it the live `InstanceRegistry` view, grouped by model (rebuilt only
when membership changes, detected by the identity of the registry's cached tuple), and
reports `on_dispatch` / `on_finish` back.

Session affinity (header `x-session-id`, or the request's `user`), keyed per tenant
(scheduler/session_affinity.py), goes through the shared store's atomic claim (Redis SET
NX), so router replicas agree on the owner; the owner goes first in the decision while it
is healthy and not draining. A claim's answer is cached for AFFINITY_CACHE_S.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

from router.config import RouterConfig
from router.registry import InstanceRegistry
from router.state import StateStore
from router.tenants import Tenant
from scheduler.dispatch import DispatchPolicy
from scheduler.layer import DecisionLayer, group_by_model
from scheduler.session_affinity import affinity_key, can_own, with_owner
from scheduler.types import Decision, InstanceState, RequestInfo, SloClass
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)
# A store outage would otherwise log once per request (1,141 lines in a few seconds).
_store_down = RateLimitedLog(log, interval_s=10.0)

CHARS_PER_TOKEN = 4  # estimate of prompt tokens from characters (no tokenizer on the hot path)
PREFIX_BLOCK_CHARS = 64  # ~16 tokens, vLLM's default KV block size
MAX_PREFIX_BLOCKS = 64
# A session's owner, once read from the store, is reused for this long without asking the
# store again (one round trip per request otherwise; a file-store claim rewrites the file).
# An owner that turns unhealthy or draining is never reused from the cache, so replicas can
# disagree only while one of them still sees an owner healthy that another has ejected.
AFFINITY_CACHE_S = 2.0
AFFINITY_CACHE_ENTRIES = 100_000


# RequestInfo is a frozen dataclass: its generated __init__, a Python frame, sets each of its
# 11 fields with `object.__setattr__`: ~20,000 instructions a request in the compiled router,
# against ~12,000 for the same calls made from this compiled module (callgrind of
# bench/router_instructions.py's load, docs/benchmarks.md issue 17 stop 24). Only while the
# fields are these: a field added to RequestInfo falls back to its constructor.
_REQUEST_FIELDS = ("request_id", "model", "input_tokens", "max_output_tokens", "tenant", "slo_class", "session_id",
                   "prefix_hashes", "predicted_rank", "p_small_ok", "arrival_s")
_FAST_REQUEST_INFO = tuple(f.name for f in dataclasses.fields(RequestInfo)) == _REQUEST_FIELDS
_new = object.__new__
_set = object.__setattr__


def new_request_info(request_id: str, model: str, input_tokens: int, max_output_tokens: int | None, tenant: str,
                     slo_class: str, session_id: str | None, prefix_hashes: tuple[int, ...],
                     arrival_s: float) -> RequestInfo:
    """`RequestInfo(...)` of these fields (no ranker predictions yet), equal to what its
    constructor builds; see `_REQUEST_FIELDS`."""
    if not _FAST_REQUEST_INFO:
        return RequestInfo(request_id=request_id, model=model, input_tokens=input_tokens,
                           max_output_tokens=max_output_tokens, tenant=tenant, slo_class=slo_class,
                           session_id=session_id, prefix_hashes=prefix_hashes, arrival_s=arrival_s)
    info: RequestInfo = _new(RequestInfo)
    _set(info, "request_id", request_id)
    _set(info, "model", model)
    _set(info, "input_tokens", input_tokens)
    _set(info, "max_output_tokens", max_output_tokens)
    _set(info, "tenant", tenant)
    _set(info, "slo_class", slo_class)
    _set(info, "session_id", session_id)
    _set(info, "prefix_hashes", prefix_hashes)
    _set(info, "predicted_rank", None)
    _set(info, "p_small_ok", None)
    _set(info, "arrival_s", arrival_s)
    return info


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The prompt's text, concatenated (message contents for chat, the prompt otherwise)."""
    if chat:
        parts: list[str] = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        parts.append(part["text"])
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def estimate_tokens(body: dict[str, Any], text: str) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)  # already token ids
    return max(1, len(text) // CHARS_PER_TOKEN)


def prefix_hashes(text: str) -> tuple[int, ...]:
    """Chained CRC32 of the prompt's leading blocks: equal prefixes give equal leading hashes,
    in every router replica (Python's hash() is salted per process)."""
    data = text.encode("utf-8", "surrogatepass")
    hashes = []
    value = 0
    end = min(len(data), PREFIX_BLOCK_CHARS * MAX_PREFIX_BLOCKS)
    for start in range(0, end - PREFIX_BLOCK_CHARS + 1, PREFIX_BLOCK_CHARS):
        value = zlib.crc32(data[start:start + PREFIX_BLOCK_CHARS], value)
        hashes.append(value)
    return tuple(hashes)


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: InstanceRegistry, store: StateStore | None = None,
                 seed: int | None = None) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.layer = DecisionLayer(config.policy, seed=seed)
        self.policies: dict[str, DispatchPolicy] = self.layer.profiles
        self.max_candidates = self.layer.max_candidates
        self.affinity_enabled = config.policy.affinity.enabled
        self.affinity_ttl_s = config.policy.affinity.ttl_s
        # Whether `decide` may consult the store for a session's owner; when not (or the
        # request has no session), `decide_local` is the whole decision and needs no await.
        self.affinity_active = store is not None and self.affinity_enabled
        self._snapshot: Sequence[InstanceState] | None = None
        self._by_model: dict[str, tuple[InstanceState, ...]] = {}
        self._models: list[str] = []
        self._affinity_cache: dict[str, tuple[str, float]] = {}  # key -> (owner, valid until)
        for name, policy in self.policies.items():
            if not any(part.name == "not_cordoned" for part in policy.filters):
                # A profile that lists its filters predates cordons, or leaves them out.
                log.warning("dispatch profile ignores cordons: add not_cordoned to its filters for "
                            "`tokenyard instances cordon` to hold", extra={"profile": name})

    # -- request description ------------------------------------------------------------
    def slo_class(self, tenant: Tenant) -> SloClass:
        found = self.config.slo_classes.get(tenant.slo_class)
        if found is None:
            found = next(iter(self.config.slo_classes.values()))
        return found

    def priority(self, info: RequestInfo, tenant: Tenant) -> int:
        """The engine priority to forward: an Admin-set tenant priority, else the document's
        `queue.engine_priority` policy (the simulator's very call)."""
        if tenant.priority is not None:
            return tenant.priority
        return self.layer.priority(info, time.monotonic())

    def policy_name(self, tenant: Tenant) -> str:
        """The tenant's pinned profile (config or Admin API) if it exists, else the
        document's selection by tenant and SLO class."""
        if tenant.policy is not None and tenant.policy in self.policies:
            return tenant.policy
        return self.layer.document.profile_for(tenant.name, tenant.slo_class)

    def request_info(self, body: dict[str, Any], chat: bool, tenant: Tenant, request_id: str,
                     session_id: str | None) -> RequestInfo:
        text = prompt_text(body, chat)
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if session_id is None:
            user = body.get("user")
            session_id = user if isinstance(user, str) and user else None
        return new_request_info(request_id, body["model"], estimate_tokens(body, text),
                                max_tokens if isinstance(max_tokens, int) else None, tenant.name, tenant.slo_class,
                                session_id, prefix_hashes(text), time.monotonic())

    # -- candidates ---------------------------------------------------------------------
    def _index(self) -> dict[str, tuple[InstanceState, ...]]:
        snapshot = self.registry.instances()
        if snapshot is not self._snapshot:
            self._by_model = group_by_model(snapshot)
            self._models = sorted({state.model for state in snapshot})
            self._snapshot = snapshot
        return self._by_model

    def models(self) -> list[str]:
        """Models the fleet serves (the union over registered instances)."""
        self._index()
        return self._models

    def serves(self, model: str) -> bool:
        return model.lower() in self._index()

    def candidates(self, model: str) -> tuple[InstanceState, ...]:
        return self._index().get(model.lower(), ())

    # -- decisions ----------------------------------------------------------------------
    def decide_local(self, info: RequestInfo, policy: DispatchPolicy, explain: bool = False,
                     group: Sequence[InstanceState] | None = None) -> Decision:
        """The policy's decision over this model's instances (pure CPU, no I/O). `group`:
        `candidates(info.model)` when the caller has just read it (nothing ran since)."""
        if group is None:
            group = self.candidates(info.model)
        return self.layer.decide(policy, group, info, time.monotonic(), fallback=self.registry.instances(),
                                 explain=explain)

    async def decide(self, info: RequestInfo, policy: DispatchPolicy, explain: bool = False) -> Decision:
        decision = self.decide_local(info, policy, explain)
        if info.session_id is None or not self.affinity_active:
            return decision
        return await self._apply_affinity(info, decision)

    def affinity_key(self, info: RequestInfo) -> str:
        return affinity_key(info)

    def usable(self, instance_id: str, model: str) -> bool:
        found = self.registry.find(instance_id)
        return can_own(found[1] if found is not None else None, model)

    async def _apply_affinity(self, info: RequestInfo, decision: Decision) -> Decision:
        assert self.store is not None
        key = self.affinity_key(info)
        chosen = decision.instance_id
        now_s = time.monotonic()
        cached = self._affinity_cache.get(key)
        if cached is not None and cached[1] > now_s and self.usable(cached[0], info.model):
            return with_owner(decision, cached[0])
        try:
            # The claim protocol of scheduler/session_affinity.py, on the async store.
            owner = await self.store.claim_affinity(key, chosen, self.affinity_ttl_s)
            if owner != chosen and not self.usable(owner, info.model):
                # The owner left or is unhealthy: the session moves to this decision's pick.
                await self.store.drop_affinity(key)
                owner = await self.store.claim_affinity(key, chosen, self.affinity_ttl_s)
        except Exception as exc:  # the store being down must not fail the request
            _store_down.warning("affinity", "session affinity unavailable", extra={"error": str(exc)})
            return decision
        if len(self._affinity_cache) >= AFFINITY_CACHE_ENTRIES:
            self._affinity_cache.clear()
        self._affinity_cache[key] = (owner, now_s + AFFINITY_CACHE_S)
        if owner == chosen or not self.usable(owner, info.model):
            return decision
        return with_owner(decision, owner)

    async def moved(self, info: RequestInfo, instance_id: str) -> None:
        """The session's request was served by a fallback: the session follows it."""
        if info.session_id is None or self.store is None or not self.affinity_enabled:
            return
        key = self.affinity_key(info)
        self._affinity_cache.pop(key, None)
        try:
            await self.store.drop_affinity(key)
            await self.store.claim_affinity(key, instance_id, self.affinity_ttl_s)
        except Exception as exc:
            _store_down.warning("affinity-update", "session affinity update failed", extra={"error": str(exc)})
