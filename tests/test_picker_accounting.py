"""Picker gRPC decisions are dispatches like HTTP ones: the profile sees `on_dispatch`, and
the pick counts in flight on its instance for a lease (a gateway reports no finish)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import router.app as app_module
from router.app import Router
from router.auth import control_channel, write_token_file
from router.config import parse_router_config
from router.state import InstanceRecord, open_store
from tokenyard.v1 import picker_pb2, picker_pb2_grpc


async def test_picks_call_on_dispatch_and_count_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "PICK_INFLIGHT_LEASE_S", 0.3)
    token = write_token_file(tmp_path / "tokens.yaml", "gateway", ["picker"])
    doc = {"control": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")},
           "policy": {"profiles": {"default": {"scorers": [], "picker": "round_robin"}}}}
    router = Router(parse_router_config(doc, "r.yaml"), store=open_store(f"file://{tmp_path / 'state.json'}"))
    await router.start(background=False)
    try:
        for name in ("a", "b", "c"):
            router.registry.upsert(InstanceRecord(name, f"http://127.0.0.1:{ord(name)}", "llama-3-8b"))
        async with control_channel(f"127.0.0.1:{router.control_server.bound_port}", token) as channel:
            stub = picker_pb2_grpc.PickerStub(channel)
            chosen = []
            for n in range(3):
                reply = await stub.Pick(picker_pb2.PickRequest(request_id=f"r{n}", model="llama-3-8b"), timeout=10)
                chosen.append(reply.endpoints[0].instance_id)
        assert chosen == ["a", "b", "c"]  # round-robin advanced: each pick was reported as a dispatch
        assert [router.registry.get(i)[1].router_inflight for i in "abc"] == [1, 1, 1]
        await asyncio.sleep(0.5)
        assert [router.registry.get(i)[1].router_inflight for i in "abc"] == [0, 0, 0]  # the lease ran out
    finally:
        await router.stop()
