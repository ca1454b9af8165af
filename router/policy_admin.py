"""The versioned-policy RPCs of the Admin service (apply, get, list, history, rollback, remove).

`PolicyAdminMixin` is mixed into `router.admin_grpc.AdminService`, which supplies `store`,
`slo_classes` and `dispatch_policies` (the names a spec may reference). Storage and
validation live in router/policy_versions.py; this module maps them to gRPC: a bad spec
is INVALID_ARGUMENT naming the key path, a lost compare-and-set is ABORTED naming the
current version, an unknown tenant or version NOT_FOUND, an unreachable store
UNAVAILABLE. Roles (router/auth.py METHOD_ROLES): reads need viewer, writes admin.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NoReturn

import grpc

from router.auth import current_principal
from router.policy_versions import (
    PolicySpecError,
    PolicyVersion,
    PolicyVersions,
    VersionConflict,
    check_name,
    check_references,
    diff_specs,
    parse_spec,
    spec_dict,
)
from router.state import StateStore, StateStoreError, store_unavailable
from tokenyard.v1 import admin_pb2

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _who() -> str:
    principal = current_principal.get()
    return principal.name if principal is not None else ""


def version_message(found: PolicyVersion) -> admin_pb2.PolicyVersion:
    return admin_pb2.PolicyVersion(
        name=found.name, version=found.version,
        spec_json=json.dumps(found.spec, sort_keys=True) if found.spec is not None else "",
        author=found.author, created_unix_ms=found.created_unix_ms, reason=found.reason, diff=found.diff,
        deleted=found.spec is None)


class PolicyAdminMixin:
    """Versioned policy RPCs; the host class sets the attributes below."""

    store: StateStore | None
    slo_classes: Collection[str] | None
    dispatch_policies: Collection[str] | None

    def _versions(self) -> PolicyVersions:
        if self.store is None:
            raise StateStoreError("this router has no state store, so it keeps no policies")
        found: PolicyVersions | None = getattr(self, "_policy_versions", None)
        if found is None or found.backend.store is not self.store:
            found = PolicyVersions(self.store)
            self._policy_versions = found
        return found

    async def _versions_call(self, context: grpc.aio.ServicerContext,
                             call: Callable[[PolicyVersions], Awaitable[Any]]) -> Any:
        try:
            return await call(self._versions())
        except PolicySpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except VersionConflict as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        except LookupError as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc).strip("'\""))
        except Exception as exc:
            message = store_unavailable(exc)
            if message is None:
                raise
            await _abort(context, grpc.StatusCode.UNAVAILABLE, message)

    def validated_spec(self, name: str, raw: Any, where: str = "spec") -> dict[str, Any]:
        """The stored form of a spec, or PolicySpecError naming the key path."""
        check_name(name)
        spec = parse_spec(raw, where)
        check_references(spec, self.slo_classes, self.dispatch_policies, where)
        return spec_dict(spec)

    async def _write(self, context: grpc.aio.ServicerContext, name: str, spec: dict[str, Any] | None,
                     expected: int | None, reason: str, dry_run: bool, action: str) -> admin_pb2.ApplyPolicyResponse:
        async def run(versions: PolicyVersions) -> admin_pb2.ApplyPolicyResponse:
            if dry_run:
                current = await versions.current(name)
                at = current.version if current is not None else 0
                if expected is not None and expected != at:
                    raise VersionConflict(name, expected, at)
                if current is None and spec is None:
                    raise LookupError(f"policy {name!r} does not exist")
                if not reason.strip():
                    raise PolicySpecError("reason: required (say why the policy changes; it is kept in the history)")
                changed = current is None or current.spec != spec
                would = PolicyVersion(name, at + (1 if changed else 0), spec, _who(), 0, reason,
                                      diff_specs(name, current, spec, f"{name}@v{at + 1}") if changed else "")
                return admin_pb2.ApplyPolicyResponse(policy=version_message(would), changed=changed, dry_run=True)
            stored, changed = await versions.commit(name, spec, expected_version=expected, author=_who(),
                                                    reason=reason)
            if changed:
                log.info(f"policy {action}", extra={"tenant": name, "version": stored.version,
                                                    "principal": _who(), "reason": reason})
            return admin_pb2.ApplyPolicyResponse(policy=version_message(stored), changed=changed)

        result: admin_pb2.ApplyPolicyResponse = await self._versions_call(context, run)
        return result

    # -- RPCs ------------------------------------------------------------------------------
    async def ApplyPolicy(self, request: admin_pb2.ApplyPolicyRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        try:
            raw = json.loads(request.spec_json or "{}")
            spec = self.validated_spec(request.name, raw)
        except json.JSONDecodeError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"spec_json: not valid JSON ({exc.msg})")
        except PolicySpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        expected = request.expected_version if request.HasField("expected_version") else None
        return await self._write(context, request.name, spec, expected, request.reason, request.dry_run, "applied")

    async def GetPolicyVersion(self, request: admin_pb2.GetPolicyVersionRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.PolicyVersion:
        async def run(versions: PolicyVersions) -> PolicyVersion:
            found = (await versions.get(request.name, request.version) if request.version
                     else await versions.current(request.name))
            if found is None:
                what = f"version {request.version} of policy" if request.version else "policy"
                raise LookupError(f"{what} {request.name!r} does not exist")
            return found

        return version_message(await self._versions_call(context, run))

    async def ListCurrentPolicies(self, request: admin_pb2.ListCurrentPoliciesRequest,
                                  context: grpc.aio.ServicerContext) -> admin_pb2.ListCurrentPoliciesResponse:
        found = await self._versions_call(context, lambda v: v.list_current())
        return admin_pb2.ListCurrentPoliciesResponse(policies=[version_message(p) for p in found])

    async def PolicyHistory(self, request: admin_pb2.PolicyHistoryRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.PolicyHistoryResponse:
        found = await self._versions_call(context, lambda v: v.history(request.name, request.limit or 20))
        if not found:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"policy {request.name!r} has no history")
        return admin_pb2.PolicyHistoryResponse(versions=[version_message(p) for p in found])

    async def RollbackPolicy(self, request: admin_pb2.RollbackPolicyRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        old = await self._versions_call(context, lambda v: v.get(request.name, request.to_version))
        if old is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"to_version: policy {request.name!r} has no version {request.to_version}")
        if old.spec is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"to_version: version {request.to_version} of {request.name!r} is a deletion; "
                         "use RemovePolicy to delete")
        try:  # the router's classes or profiles may have changed since that version
            spec = self.validated_spec(request.name, old.spec, f"v{old.version}.spec")
        except PolicySpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cannot roll back: {exc}")
        expected = request.expected_version if request.HasField("expected_version") else None
        reason = request.reason if not request.reason.strip() else f"{request.reason} (rollback to v{old.version})"
        return await self._write(context, request.name, spec, expected, reason, request.dry_run, "rolled back")

    async def RemovePolicy(self, request: admin_pb2.RemovePolicyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        return await self._write(context, request.name, None, expected, request.reason, request.dry_run, "deleted")
