"""The request-records RPC of the Admin service: `RecentRecords`, what this router replica
served in the last `window_s` (router/records.py), for `tokenyard policy apply
--dry-run=server` to replay in the simulator (cli/policy_replay.py). Viewer role.

Bounded: at most `max_records` records and `max_bytes` of their JSON (defaults below,
hard caps in router.records), sent in chunks of ~`CHUNK_BYTES` so that no message nears
gRPC's 4 MiB default receive limit; the files are read on a worker thread, never on the
event loop, and files last written before the window are not opened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from router.records import MAX_READ_BYTES, MAX_READ_RECORDS
from tokenyard.v1 import admin_pb2

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 3600.0
MAX_WINDOW_S = 7 * 24 * 3600.0
DEFAULT_MAX_RECORDS = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1 << 20


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class RecordsAdminMixin:
    records: Any  # router.records.RequestRecords, or None when the router keeps none

    async def RecentRecords(self, request: admin_pb2.RecentRecordsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb2.RecordsChunk]:
        if self.records is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "this router keeps no request records: add a `records: {path: ...}` section to its "
                         "config (docs/admin.md), or pass --trace FILE to replay a trace instead")
        window_s = request.window_s or DEFAULT_WINDOW_S
        if not 0 < window_s <= MAX_WINDOW_S:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"window_s: expected a number of seconds in (0, {MAX_WINDOW_S:.0f}], got {request.window_s}")
        max_records = request.max_records or DEFAULT_MAX_RECORDS
        max_bytes = request.max_bytes or DEFAULT_MAX_BYTES
        if max_records > MAX_READ_RECORDS or max_bytes > MAX_READ_BYTES:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"max_records and max_bytes: at most {MAX_READ_RECORDS} and {MAX_READ_BYTES}, got "
                         f"{request.max_records} and {request.max_bytes}")
        lines, truncated = await asyncio.to_thread(self.records.recent, time.time() - window_s, max_records,
                                                   max_bytes)
        chunk: list[str] = []
        size = 0
        for line in lines:
            chunk.append(line.decode("utf-8", "replace"))
            size += len(line)
            if size >= CHUNK_BYTES:
                yield admin_pb2.RecordsChunk(records_json=chunk)
                chunk, size = [], 0
        yield admin_pb2.RecordsChunk(records_json=chunk, truncated=truncated, total=len(lines),
                                     source=str(self.records.settings.path))
