"""The API-key RPCs of the Admin service (create, rotate, revoke, list); admin role only
(router/auth.py: a method not in METHOD_ROLES needs admin). Storage: router/keys.py."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc

from router.auth import current_principal
from router.keys import ApiKeyRecord, KeyStore
from router.policy_versions import PolicySpecError, check_name
from router.state import StateStore, StateStoreError, store_unavailable
from tokenyard.v1 import admin_pb2

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def key_info(record: ApiKeyRecord) -> admin_pb2.ApiKeyInfo:
    return admin_pb2.ApiKeyInfo(key_id=record.key_id, tenant=record.tenant, created_unix_ms=record.created_unix_ms,
                                revoked_unix_ms=record.revoked_unix_ms)


def _who() -> str:
    principal = current_principal.get()
    return principal.name if principal is not None else ""


class KeysAdminMixin:
    store: StateStore | None

    async def _keys_call(self, context: grpc.aio.ServicerContext, call: Callable[[KeyStore], Awaitable[Any]]) -> Any:
        try:
            if self.store is None:
                raise StateStoreError("this router has no state store, so it keeps no API keys")
            return await call(KeyStore(self.store))
        except PolicySpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LookupError as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc).strip("'\""))
        except Exception as exc:
            message = store_unavailable(exc)
            if message is None:
                raise
            await _abort(context, grpc.StatusCode.UNAVAILABLE, message)

    async def CreateApiKey(self, request: admin_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ApiKeyCreated:
        async def create(keys: KeyStore) -> tuple[str, ApiKeyRecord]:
            check_name(request.tenant, "tenant")
            return await keys.create(request.tenant)

        api_key, record = await self._keys_call(context, create)
        log.info("API key created", extra={"tenant": record.tenant, "key_id": record.key_id, "principal": _who()})
        return admin_pb2.ApiKeyCreated(key=key_info(record), api_key=api_key)

    async def RotateApiKey(self, request: admin_pb2.RotateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ApiKeyCreated:
        api_key, record = await self._keys_call(context, lambda keys: keys.rotate(request.key_id))
        log.info("API key rotated", extra={"tenant": record.tenant, "old_key_id": request.key_id,
                                           "key_id": record.key_id, "principal": _who()})
        return admin_pb2.ApiKeyCreated(key=key_info(record), api_key=api_key)

    async def RevokeApiKey(self, request: admin_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ApiKeyInfo:
        record = await self._keys_call(context, lambda keys: keys.revoke(request.key_id))
        log.info("API key revoked", extra={"tenant": record.tenant, "key_id": record.key_id, "principal": _who()})
        return key_info(record)

    async def ListApiKeys(self, request: admin_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListApiKeysResponse:
        records = await self._keys_call(context, lambda keys: keys.all())
        chosen = sorted((r for r in records if not request.tenant or r.tenant == request.tenant),
                        key=lambda r: (r.tenant, r.created_unix_ms, r.key_id))
        return admin_pb2.ListApiKeysResponse(keys=[key_info(r) for r in chosen])
