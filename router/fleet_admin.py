"""The fleet RPCs of the Admin service: cordon, an operator's migration, the current plan.

`FleetAdminMixin` is mixed into `router.admin_grpc.AdminService`, which supplies
`registry`, `store`, `migration` (the router's `MigrationLoop`, None when the policy
document's `migration:` is off) and `_info` (an instance as ListInstances shows it).

- CordonInstance (operator): the cordon and its audit (who, when, why) go into the
  instance's record in the store through the registry's write-through, so every replica's
  `not_cordoned` filter (scheduler/policies/basic.py) sees it within a second, as a drain.
  Every change is logged with the principal and the reason.
- TriggerMigration (operator): `MigrationLoop.trigger`, answered when the move has ended.
- GetPlan (viewer): the document the control plane's leader keeps in the store
  (router/plan_record.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import grpc

from router.auth import current_principal
from router.migration_loop import MigrationLoop, MigrationRefused
from router.plan_record import PLAN_KEY, PlanRecordError, plan_message
from router.registry import InstanceRegistry
from router.state import StateStore, cordon_note, store_unavailable
from tokenyard.v1 import admin_pb2, worker_pb2

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1024
STORE_WRITE_TIMEOUT_S = 5.0  # the registry's writer retries a store that is down; we answer sooner
_MAX_ID_CHARS = 253


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _who() -> str:
    principal = current_principal.get()
    return principal.name if principal is not None else ""


def cordon_message(cordon: dict[str, Any] | None) -> admin_pb2.CordonInfo | None:
    if cordon is None:
        return None
    return admin_pb2.CordonInfo(by=str(cordon.get("by", "")), at_unix_ms=int(cordon.get("at_unix_ms", 0)),
                                reason=str(cordon.get("reason", "")))


class FleetAdminMixin:
    """Cordon, migrate, plan; the host class sets the attributes below."""

    registry: InstanceRegistry
    store: StateStore | None
    migration: MigrationLoop | None

    def _info(self, instance_id: str) -> admin_pb2.InstanceInfo:
        raise NotImplementedError

    async def CordonInstance(self, request: admin_pb2.CordonInstanceRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.CordonInstanceResponse:
        reason = request.reason.strip()
        if not request.instance_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instance_id: required")
        if not reason:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "reason: required (say why; it is kept with the cordon and logged)")
        if len(reason) > MAX_REASON_CHARS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"reason: at most {MAX_REASON_CHARS} characters, got {len(reason)}")
        found = self.registry.find(request.instance_id)
        if found is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"instance {request.instance_id!r} is not registered")
        before = found[0].cordon
        changed = (before is not None) != request.cordoned
        if changed:
            note = cordon_note(_who(), reason) if request.cordoned else None
            self.registry.set_cordon(request.instance_id, note)
            try:  # in the store, so that the other replicas follow, before we answer
                async with asyncio.timeout(STORE_WRITE_TIMEOUT_S):
                    await self.registry.flush()
            except TimeoutError:
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             f"state store unavailable: the {'cordon' if request.cordoned else 'uncordon'} holds on "
                             f"this replica and reaches the store (and the other replicas) once it is back; "
                             f"not confirmed within {STORE_WRITE_TIMEOUT_S:.0f} s")
        log.warning("instance cordoned" if request.cordoned else "instance uncordoned", extra={
            "instance": request.instance_id, "principal": _who(), "reason": reason, "changed": changed,
            "previous_cordon_by": (before or {}).get("by", "")})
        after = self.registry.get(request.instance_id)[0].cordon
        return admin_pb2.CordonInstanceResponse(instance=self._info(request.instance_id),
                                                cordon=cordon_message(after), changed=changed)

    async def TriggerMigration(self, request: admin_pb2.TriggerMigrationRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.TriggerMigrationResponse:
        for field, value in (("source_instance_id", request.source_instance_id),
                             ("destination_instance_id", request.destination_instance_id),
                             ("request_id", request.request_id)):
            if len(value) > _MAX_ID_CHARS:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{field}: at most {_MAX_ID_CHARS} characters")
        if not request.source_instance_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "source_instance_id: required")
        if len(request.reason) > MAX_REASON_CHARS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"reason: at most {MAX_REASON_CHARS} characters")
        if self.migration is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "migration is not enabled in this router's policy document: set migration: {enabled: true} "
                         "(docs/migration.md) and give the engines a Worker address")
        try:
            outcome = await self.migration.trigger(request.source_instance_id, request.destination_instance_id,
                                                   request.request_id)
        except MigrationRefused as exc:
            log.info("operator migration refused", extra={"principal": _who(), "from": request.source_instance_id,
                                                          "to": request.destination_instance_id, "error": str(exc)})
            await _abort(context, grpc.StatusCode.NOT_FOUND if exc.missing else grpc.StatusCode.FAILED_PRECONDITION,
                         str(exc))
        final = outcome.final
        committed = final.state == worker_pb2.COMMITTED
        log.warning("operator migration ended", extra={
            "principal": _who(), "reason": request.reason, "request_id": outcome.order.request_id,
            "from": outcome.order.source_id, "to": outcome.order.destination_id, "committed": committed,
            "error": worker_pb2.MigrationError.Name(final.error)})
        return admin_pb2.TriggerMigrationResponse(
            migration_id=outcome.migration_id, request_id=outcome.order.request_id,
            source_instance_id=outcome.order.source_id, destination_instance_id=outcome.order.destination_id,
            committed=committed, state=worker_pb2.MigrationState.Name(final.state),
            error="" if final.error == worker_pb2.MIGRATION_ERROR_NONE else worker_pb2.MigrationError.Name(final.error),
            error_message=final.error_message, blocks_copied=final.blocks_copied, suspended_us=final.suspended_us,
            duration_ms=round(outcome.duration_s * 1000, 3))

    async def GetPlan(self, request: admin_pb2.GetPlanRequest,
                      context: grpc.aio.ServicerContext) -> admin_pb2.PlanStatus:
        if self.store is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         "this router has no state store, so no control plane plan reaches it")
        try:
            doc = (await self.store.get_loads()).get(PLAN_KEY)
        except Exception as exc:
            message = store_unavailable(exc)
            if message is None:
                raise
            await _abort(context, grpc.StatusCode.UNAVAILABLE, message)
        if doc is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"no plan in the state store {self.store.url}: no control plane (`tokenyard controlplane`) "
                         "leads over this store, or it has not finished a round yet")
        try:
            message_: admin_pb2.PlanStatus = plan_message(doc)
        except PlanRecordError as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return message_
