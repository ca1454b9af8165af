"""The emulated engine's side of live migration: the steps sim/migration_worker.py drives.

`EngineMigration` is mixed into `sim.emulated_engine.EmulatedEngine`: it suspends,
resumes and releases a running request at the source, reserves blocks and adopts a copied
request at the destination (which a client then `attach`es to), and lists the requests
that could move. Kept apart so that the engine loop's module stays about the loop; the
state it reads (`core`, `_handles`, `_kv`, `_attachable`, `_wake`, `_notifier`) is the
engine's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from orjson import loads as orjson_loads

from sim.engine_core import EngineRequest, RequestStatus
from sim.migration_worker import MigrationAborted, RequestKV, RequestState
from sim.request_handle import RequestHandle
from sim.textgen import OutputText
from tokenyard.v1 import worker_pb2 as pb

if TYPE_CHECKING:
    from sim.engine_core import EngineCore
    from sim.worker_grpc import LoadChangeNotifier

log = logging.getLogger(__name__)


class EngineMigration:
    """Migration steps of an emulated engine (a mixin of EmulatedEngine)."""

    core: EngineCore
    _handles: dict[str, RequestHandle]
    _kv: dict[str, RequestKV]
    _attachable: dict[str, RequestHandle]
    _wake: asyncio.Event | None
    _notifier: LoadChangeNotifier
    instance_id: str
    failure: str | None
    kv_wire_bytes_per_token: int

    if TYPE_CHECKING:
        # Supplied by EmulatedEngine; declared here (for the type checker only) so the
        # mixin's steps are checked against them without changing the class at run time.
        @property
        def block_size(self) -> int: ...

        @property
        def max_model_len(self) -> int: ...

        def new_request_id(self) -> str: ...

        def abort(self, request_id: str) -> bool: ...

    def migration_candidate_problem(self, request_id: str) -> str | None:
        """Why `request_id` cannot migrate out now, or None if it can."""
        handle = self._handles.get(request_id)
        req = self.core.requests.get(request_id)
        if handle is None or req is None:
            return f"no running request {request_id!r} on {self.instance_id}"
        if req.status is not RequestStatus.RUNNING or req.generated_tokens < 1 or req.is_prefilling:
            return f"request {request_id!r} is not decoding (status {req.status.value})"
        return None

    def _request_kv(self, request_id: str, handle: RequestHandle) -> RequestKV:
        kv = self._kv.get(request_id)
        if kv is None:
            kv = RequestKV(handle.text_seed, self.kv_wire_bytes_per_token, self.block_size)
        return kv

    def migration_state(self, request_id: str) -> RequestState:
        """The request's progress now; MigrationAborted if it can no longer move."""
        handle = self._handles.get(request_id)
        req = self.core.requests.get(request_id)
        if handle is None or req is None:
            finished = handle is None and request_id not in self.core.requests
            raise MigrationAborted(pb.SOURCE_UNREACHABLE if self.failure else
                                   (pb.REQUEST_FINISHED if finished else pb.REQUEST_GONE),
                                   f"request {request_id} finished or went away at the source")
        if req.status is RequestStatus.WAITING:
            raise MigrationAborted(pb.REQUEST_PREEMPTED, f"request {request_id} was preempted at the source")
        return RequestState(
            prompt_tokens=req.prompt_tokens, tokens_generated=req.generated_tokens,
            context_tokens=req.computed_tokens, max_tokens=handle.max_tokens, priority=req.priority,
            engine_state={"text_seed": handle.text_seed, "output_tokens": req.output_tokens,
                          "text_offset": handle.text_offset},
            kv=self._request_kv(request_id, handle),
        )

    def migration_suspend(self, request_id: str) -> RequestState:
        state = self.migration_state(request_id)
        if state.context_tokens != state.prompt_tokens + state.tokens_generated - 1:
            raise MigrationAborted(pb.REQUEST_PREEMPTED, f"request {request_id} is not decoding")
        self.core.suspend(request_id)
        return state

    def migration_resume(self, request_id: str) -> None:
        if request_id in self.core.suspended:
            self.core.resume(request_id)
            if self._wake is not None:
                self._wake.set()

    def migration_release(self, request_id: str, destination: dict[str, Any]) -> None:
        """The request runs at the destination now: end its stream here with where it went."""
        self.core.release_migrated(request_id)
        self._kv.pop(request_id, None)
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.migrated_to = destination
            handle.finish_reason = "migrated"
            handle.finish_s = time.monotonic()
            handle.done = True
            handle._wake()
        if self._wake is not None:
            self._wake.set()
        self._notifier.notify()

    @staticmethod
    def migration_seed(engine_state: bytes) -> int:
        try:
            return int(orjson_loads(engine_state)["text_seed"])
        except (ValueError, KeyError, TypeError):
            raise MigrationAborted(pb.INCOMPATIBLE, "engine_state: expected JSON with text_seed and output_tokens") from None

    def migration_reserve(self, begin: pb.MigrateInBegin) -> int:
        """Reserve KV blocks for an incoming request: for all of max_tokens when they are
        free, else at least what it holds now plus one; MigrationAborted(OOM) if not even that."""
        bs = self.block_size
        if begin.prompt_tokens + begin.max_tokens > self.max_model_len:
            raise MigrationAborted(pb.INCOMPATIBLE, f"{begin.prompt_tokens} + {begin.max_tokens} tokens exceed "
                                       f"max_model_len {self.max_model_len}")
        least = -(-(begin.prompt_tokens + begin.tokens_generated) // bs) + 1
        want = -(-(begin.prompt_tokens + begin.max_tokens) // bs)
        for blocks in (max(want, least), least):
            if self.core.reserve_blocks(blocks):
                return blocks
        raise MigrationAborted(pb.DESTINATION_OUT_OF_MEMORY, f"{self.instance_id}: {least} KV blocks needed, "
                                  f"{self.core.kv.available_blocks} free")

    def migration_unreserve(self, blocks: int) -> None:
        self.core.unreserve_blocks(blocks)
        if self._wake is not None:
            self._wake.set()

    def migration_adopt(self, begin: pb.MigrateInBegin, commit: pb.MigrateInCommit, kv: RequestKV, reserved_blocks: int) -> str:
        """Run the copied request from its exact token; returns its id here."""
        state = orjson_loads(begin.engine_state)
        request_id = begin.request_id if begin.request_id not in self._handles else self.new_request_id()
        now = time.monotonic()
        req = EngineRequest(request_id=request_id, prompt_tokens=begin.prompt_tokens,
                            output_tokens=int(state["output_tokens"]), arrival_s=now, priority=begin.priority)
        req.generated_tokens = commit.tokens_generated
        req.computed_tokens = commit.context_tokens
        req.first_token_s = req.last_token_s = now
        self.core.adopt(req, reserved_blocks)
        offset = int(state.get("text_offset", 0))
        handle = RequestHandle(request_id, begin.prompt_tokens, req.output_tokens, begin.max_tokens,
                               begin.priority, now, OutputText.resumed(kv.seed, offset + commit.tokens_generated))
        handle.text_seed = kv.seed
        handle.text_offset = offset
        handle.emitted = handle.consumed = commit.tokens_generated
        handle.first_token_s = handle.last_token_s = handle.scheduled_s = now
        self._handles[request_id] = handle
        self._attachable[request_id] = handle
        self._kv[request_id] = kv
        timeout_s = int(state.get("attach_timeout_ms", 10_000)) / 1000.0
        asyncio.get_running_loop().call_later(timeout_s, self._drop_orphan, request_id, handle)
        if self._wake is not None:
            self._wake.set()
        self._notifier.notify()
        return request_id

    def _drop_orphan(self, request_id: str, handle: RequestHandle) -> None:
        if self._attachable.get(request_id) is handle:
            log.info("migrated request never attached; aborted", extra={"request_id": request_id})
            self.abort(request_id)

    def attach(self, request_id: str) -> RequestHandle | None:
        """The client's stream of a request that migrated in (once: a second attach gets None)."""
        return self._attachable.pop(request_id, None)

    def migration_candidates(self, limit: int, busy: set[str]) -> list[Any]:
        found = []
        for req in self.core.running:
            if req.request_id in busy or self.migration_candidate_problem(req.request_id) is not None:
                continue
            handle = self._handles[req.request_id]
            found.append(pb.MigrationCandidate(
                request_id=req.request_id, context_tokens=req.num_tokens, tokens_generated=req.generated_tokens,
                priority=req.priority, max_tokens=handle.max_tokens))
        found.sort(key=lambda c: c.context_tokens)
        return found[:limit]
