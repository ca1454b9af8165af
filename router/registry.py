"""The in-memory live view of the fleet that every request reads: `InstanceRegistry`.

The hot path only reads `instances()` (a cached tuple, rebuilt on membership change)
and bumps counters (`inflight_started` / `inflight_finished`, `update_load`), all O(1)
and without I/O. Membership, draining and cordons are written through to an optional
`StateStore` by one background writer, in order, so that several router replicas over the
same store converge; other replicas' changes arrive through `StateStore.watch()` and are
reconciled against the store's list (on each notice, and every `resync_s` since pub/sub
may drop notices). Writes are retried until they land. When the store loses instances
that this replica's own static or Kubernetes discovery found (Redis restarted empty), they
are written back rather than dropped. Health and load stay local: each replica checks
and scrapes engines itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from router.shared_inflight import SharedInflight
from router.state import InstanceRecord, StateChange, StateStore, cancel_and_wait
from scheduler.prefill_rate import note_dispatch
from scheduler.types import InstanceState
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)
_store_down = RateLimitedLog(log, interval_s=10.0)  # one line per outage, not per retry

#: A membership listener gets ("added" | "updated" | "removed" | "draining" | "cordon", record).
MembershipListener = Callable[[str, InstanceRecord], None]

_WRITE_PUT = "put"
_WRITE_REMOVE = "remove"
_WRITE_DRAIN = "drain"
_WRITE_CORDON = "cordon"
_WRITE_RESTORE = "restore"  # put unless present: never overwrites a newer remote version

# Sources whose discovery runs in every replica (config list, Kubernetes watch): a replica
# that found such an instance itself keeps it, and writes it back, when the store lost it
# (Redis restarted without persistence, a flush). Self-registered instances have no such
# witness: the store is their only truth.
_VOUCHED_SOURCES = ("static", "kubernetes")


class InstanceRegistry:
    """Instances by id: their record (where/what) and their state (load, health)."""

    def __init__(self, store: StateStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic, resync_s: float = 5.0) -> None:
        self.store = store
        self.resync_s = resync_s
        self._clock = clock
        self._records: dict[str, InstanceRecord] = {}
        self._states: dict[str, InstanceState] = {}
        self._snapshot: tuple[InstanceState, ...] = ()
        self._listeners: list[MembershipListener] = []
        self._writes: asyncio.Queue[tuple[str, str, object]] | None = None
        self._pending_writes: dict[str, int] = {}  # instance id -> queued, unfinished writes
        self._vouched: set[str] = set()  # found by this replica's own static/Kubernetes discovery
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._shared: SharedInflight | None = None

    def share_inflight(self, shared: SharedInflight) -> None:
        """Count in-flight requests with the other workers of `--workers N` (router/shared_inflight.py):
        from now on `router_inflight` is every worker's requests, not this process's only."""
        self._shared = shared
        for iid, state in self._states.items():
            shared.refresh(iid, state)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load the store's instances and follow its changes (no-op without a store)."""
        if self.store is None:
            return
        self._writes = asyncio.Queue()
        await self.reconcile()
        self._tasks.append(asyncio.create_task(self._writer(), name="registry-writer"))
        changes: asyncio.Queue[StateChange] = asyncio.Queue()
        self._tasks.append(asyncio.create_task(self._pump(changes), name="registry-pump"))
        self._tasks.append(asyncio.create_task(self._follow(changes), name="registry-follow"))

    async def flush(self) -> None:
        """Wait until every queued write-through has reached the store."""
        await self._idle.wait()

    async def close(self) -> None:
        if self._writes is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.flush()
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    # -- hot path (O(1), no I/O) -------------------------------------------------------
    def instances(self) -> Sequence[InstanceState]:
        if self._shared is not None:
            self._shared.sync(self._states)
        return self._snapshot

    def get(self, instance_id: str) -> tuple[InstanceRecord, InstanceState]:
        try:
            return self._records[instance_id], self._states[instance_id]
        except KeyError:
            raise KeyError(f"unknown instance {instance_id!r}") from None

    def find(self, instance_id: str) -> tuple[InstanceRecord, InstanceState] | None:
        record = self._records.get(instance_id)
        return None if record is None else (record, self._states[instance_id])

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[InstanceRecord]:
        return list(self._records.values())

    def inflight_started(self, instance_id: str, prompt_tokens: int = 0) -> None:
        """One more request in flight on the instance; `prompt_tokens` > 0 when this is
        a real hand-over to the engine (not a provisional hold), for its prefill rate."""
        state = self._states.get(instance_id)
        if state is not None:
            note_dispatch(state, prompt_tokens, self._clock())
            if self._shared is not None:
                self._shared.add(instance_id, 1)

    def now_s(self) -> float:
        """The registry's clock (the one its load snapshots and prefill rates are on)."""
        return self._clock()

    def inflight_finished(self, instance_id: str) -> None:
        state = self._states.get(instance_id)
        if state is not None and state.router_inflight > 0:
            state.router_inflight -= 1
        if self._shared is not None:  # also for a removed instance: its count must not stay
            self._shared.add(instance_id, -1)

    def update_load(self, instance_id: str, *, running: int | None = None,
                    waiting: int | None = None, kv_blocks_used: int | None = None,
                    kv_blocks_total: int | None = None, block_size_tokens: int | None = None,
                    tokens_in_flight: int | None = None, now_s: float | None = None) -> bool:
        """Overwrite the given load fields in place; False when the instance is unknown."""
        state = self._states.get(instance_id)
        if state is None:
            return False
        if running is not None:
            state.running = running
        if waiting is not None:
            state.waiting = waiting
        if kv_blocks_used is not None:
            state.kv_blocks_used = kv_blocks_used
        if kv_blocks_total is not None:
            state.kv_blocks_total = kv_blocks_total
        if block_size_tokens is not None:
            state.block_size_tokens = block_size_tokens
        if tokens_in_flight is not None:
            state.tokens_in_flight = tokens_in_flight
        state.updated_s = self._clock() if now_s is None else now_s
        return True

    def mark_health(self, instance_id: str, healthy: bool) -> bool:
        state = self._states.get(instance_id)
        if state is None:
            return False
        state.healthy = healthy
        return True

    # -- membership --------------------------------------------------------------------
    def add_listener(self, callback: MembershipListener) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: MembershipListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def upsert(self, record: InstanceRecord) -> None:
        """Add or update an instance (load and health survive an update)."""
        unchanged = self._records.get(record.instance_id) == record
        self._apply_upsert(record)
        if record.source in _VOUCHED_SOURCES:
            self._vouched.add(record.instance_id)
        else:
            self._vouched.discard(record.instance_id)
        # An identical record is in the store already or on its way; should another replica
        # have removed it meanwhile, a static/Kubernetes one is restored by reconcile, and
        # a self-registration (not restored) is written again here.
        if not unchanged or record.source not in _VOUCHED_SOURCES:
            self._enqueue(_WRITE_PUT, record.instance_id, replace(record, labels=dict(record.labels)))

    def remove(self, instance_id: str) -> bool:
        found = self._apply_remove(instance_id)
        self._vouched.discard(instance_id)
        self._enqueue(_WRITE_REMOVE, instance_id, None)
        return found

    def set_draining(self, instance_id: str, draining: bool) -> bool:
        found = self._apply_draining(instance_id, draining)
        if found:
            self._enqueue(_WRITE_DRAIN, instance_id, draining)
        return found

    def set_cordon(self, instance_id: str, cordon: dict[str, object] | None) -> bool:
        """Cordon (a `router.state.cordon_note`) or uncordon (None); False when unknown."""
        record = self._records.get(instance_id)
        if record is None:
            return False
        if record.cordon != cordon:
            self._apply_upsert(replace(record, cordon=None if cordon is None else dict(cordon)))
            self._enqueue(_WRITE_CORDON, instance_id, cordon)
        return True

    def _apply_upsert(self, record: InstanceRecord) -> None:
        iid = record.instance_id
        old = self._records.get(iid)
        state = self._states.get(iid)
        if old is not None and old == record:
            return
        self._records[iid] = record
        if state is None:
            self._states[iid] = InstanceState(
                instance_id=iid, model=record.model, gpu=record.gpu, pool=record.pool,
                tp=record.tp, url=record.url, draining=record.draining,
                cordoned=record.cordoned)  # updated_s 0: no load yet
            if self._shared is not None:
                self._shared.refresh(iid, self._states[iid])
            self._snapshot = tuple(self._states.values())
            event = "added"
        else:
            state.model, state.gpu, state.pool = record.model, record.gpu, record.pool
            state.tp, state.url, state.draining = record.tp, record.url, record.draining
            state.cordoned = record.cordoned
            assert old is not None
            only_drain = replace(old, draining=record.draining) == record
            only_cordon = replace(old, cordon=record.cordon) == record
            event = "draining" if only_drain else ("cordon" if only_cordon else "updated")
        log.info("instance %s", event, extra={
            "instance": iid, "model": record.model, "pool": record.pool, "url": record.url,
            "source": record.source, "draining": record.draining, "cordoned": record.cordoned})
        self._notify(event, record)

    def _apply_remove(self, instance_id: str) -> bool:
        record = self._records.pop(instance_id, None)
        if record is None:
            return False
        del self._states[instance_id]
        self._snapshot = tuple(self._states.values())
        log.info("instance removed", extra={"instance": instance_id, "source": record.source})
        self._notify("removed", record)
        return True

    def _apply_draining(self, instance_id: str, draining: bool) -> bool:
        record = self._records.get(instance_id)
        if record is None:
            return False
        if record.draining != draining:
            self._apply_upsert(replace(record, draining=draining))
        return True

    def _notify(self, event: str, record: InstanceRecord) -> None:
        for callback in list(self._listeners):
            try:
                callback(event, record)
            except Exception:
                log.exception("membership listener failed",
                              extra={"event": event, "instance": record.instance_id})

    # -- write-through and following other replicas ------------------------------------
    def _enqueue(self, op: str, instance_id: str, arg: object) -> None:
        if self._writes is None:
            return
        self._pending_writes[instance_id] = self._pending_writes.get(instance_id, 0) + 1
        self._idle.clear()
        self._writes.put_nowait((op, instance_id, arg))

    async def _writer(self) -> None:
        assert self._writes is not None and self.store is not None
        while True:
            op, iid, arg = await self._writes.get()
            try:
                # Retried until it lands: a dropped write would leave the store without
                # this change, and the next reconcile would undo it locally too. Writes
                # stay in order; while the store is down, reconcile fails as well.
                attempt = 0
                while True:
                    try:
                        if op == _WRITE_PUT:
                            assert isinstance(arg, InstanceRecord)
                            await self.store.put_instance(arg)
                        elif op == _WRITE_RESTORE:
                            assert isinstance(arg, InstanceRecord)
                            await self.store.put_instance_if_absent(arg)
                        elif op == _WRITE_REMOVE:
                            await self.store.remove_instance(iid)
                        elif op == _WRITE_CORDON:
                            assert arg is None or isinstance(arg, dict)
                            if not await self.store.set_cordon(iid, arg):
                                await self._write_whole(iid)
                        elif not await self.store.set_draining(iid, bool(arg)):
                            # The store lost the instance (restarted empty) while we still
                            # serve it: write all of it, or the drain would be lost.
                            await self._write_whole(iid)
                        break
                    except (AssertionError, TypeError, ValueError):
                        raise  # a bug, not an outage: retrying cannot help
                    except Exception as exc:  # redis and OS errors share no base class
                        attempt += 1
                        _store_down.warning(f"write:{op}", "state store write failed; retrying", extra={
                            "op": op, "instance": iid, "attempt": attempt, "store": self.store.url,
                            "error": f"{type(exc).__name__}: {exc}"})
                        await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
            except Exception:
                log.exception("state store write failed", extra={"op": op, "instance": iid})
            finally:
                left = self._pending_writes.get(iid, 1) - 1
                if left <= 0:
                    self._pending_writes.pop(iid, None)
                else:
                    self._pending_writes[iid] = left
                if self._writes.empty() and not self._pending_writes:
                    self._idle.set()

    async def _write_whole(self, instance_id: str) -> None:
        record = self._records.get(instance_id)
        if record is not None and self.store is not None:
            await self.store.put_instance(replace(record, labels=dict(record.labels)))

    async def reconcile(self) -> None:
        """Make local membership match the store, except instances with queued writes."""
        if self.store is None:
            return
        stored = {rec.instance_id: rec for rec in await self.store.list_instances()}
        for iid in list(self._records):
            if iid not in stored and iid not in self._pending_writes:
                if iid in self._vouched:
                    log.warning("instance missing from the state store; writing it back",
                                extra={"instance": iid, "store": self.store.url})
                    record = self._records[iid]
                    self._enqueue(_WRITE_RESTORE, iid, replace(record, labels=dict(record.labels)))
                else:
                    self._apply_remove(iid)
        for iid, rec in stored.items():
            if iid not in self._pending_writes:
                self._apply_upsert(rec)

    async def _pump(self, changes: asyncio.Queue[StateChange]) -> None:
        """Copy the store's change notices into `changes`, resubscribing after failures."""
        assert self.store is not None
        backoff_s = 0.2
        while True:
            try:
                async for change in self.store.watch():
                    backoff_s = 0.2
                    if change.origin and change.origin == self.store.origin:
                        continue  # our own write: already applied locally
                    if change.kind in ("instance", "any"):
                        changes.put_nowait(change)
                return  # the store was closed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _store_down.warning("watch", "watching the state store failed; resubscribing", extra={
                    "store": self.store.url, "error": str(exc), "backoff_s": backoff_s})
                # Notices were lost while down: the periodic reconcile catches up.
                changes.put_nowait(StateChange("any"))
                await asyncio.sleep(backoff_s)
                backoff_s = min(5.0, backoff_s * 2)

    async def _follow(self, changes: asyncio.Queue[StateChange]) -> None:
        """Reconcile on every batch of change notices, and every `resync_s` regardless
        (pub/sub is at-most-once: a notice sent while a replica reconnects is lost)."""
        assert self.store is not None
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # races a completed get.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync_s):
                    await changes.get()
            while not changes.empty():  # coalesce a burst into one reconcile
                changes.get_nowait()
            try:
                await self.reconcile()
            except Exception as exc:
                _store_down.warning("reconcile", "reconciling with the state store failed",
                            extra={"store": self.store.url, "error": str(exc)})
