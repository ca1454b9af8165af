"""The gRPC contracts: committed stubs match proto/, every element is documented, and the
room kept for migration stays free."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import REPO_ROOT

GENERATE = REPO_ROOT / "proto" / "generate.py"
PROTO_DIR = REPO_ROOT / "proto" / "tokenyard" / "v1"

# FileDescriptorProto field numbers used in SourceCodeInfo paths.
_MESSAGE_TYPE, _SERVICE = 4, 6
_MESSAGE_FIELD, _NESTED_TYPE, _SERVICE_METHOD = 2, 3, 2


def run_generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args], capture_output=True, text=True, timeout=120, check=False
    )


def copy_checkout(tmp_path: Path) -> Path:
    """A minimal checkout (proto/ and the committed stubs) that a test may change."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "proto" / "tokenyard", root / "proto" / "tokenyard")
    shutil.copytree(
        REPO_ROOT / "tokenyard" / "v1", root / "tokenyard" / "v1", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


def test_committed_stubs_are_up_to_date() -> None:
    result = run_generate("--check")
    assert result.returncode == 0, result.stderr


def test_check_reports_stale_and_missing_stubs_then_generate_fixes_them(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    proto = root / "proto" / "tokenyard" / "v1" / "worker.proto"
    text = proto.read_text()
    anchor = "  string incarnation_id = 14;\n"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "  uint32 new_counter = 15;\n", 1))
    (root / "tokenyard" / "v1" / "admin_pb2.pyi").unlink()

    result = run_generate("--check", "--root", str(root))
    assert result.returncode == 1
    assert "stale: " in result.stderr and "worker_pb2.py" in result.stderr
    assert "missing: " in result.stderr and "admin_pb2.pyi" in result.stderr
    assert "picker_pb2.py" not in result.stderr  # untouched contracts are not reported

    assert run_generate("--root", str(root)).returncode == 0
    assert "new_counter" in (root / "tokenyard" / "v1" / "worker_pb2.pyi").read_text()
    result = run_generate("--check", "--root", str(root))
    assert result.returncode == 0, result.stderr
    # The stubs of the real checkout were not touched by any of this.
    assert run_generate("--check").returncode == 0


def test_check_reports_stubs_without_a_proto(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    (root / "proto" / "tokenyard" / "v1" / "picker.proto").unlink()
    result = run_generate("--check", "--root", str(root))
    assert result.returncode == 1
    assert "no .proto generates it" in result.stderr and "picker_pb2_grpc.py" in result.stderr


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path / "contracts.pb"
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT / 'proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *[f"tokenyard/v1/{name}" for name in protos],
        ]
    )
    assert code == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_service_method_message_and_field_is_documented(tmp_path: Path) -> None:
    undocumented: list[str] = []
    files = _descriptor_set(tmp_path).file
    assert {f.name for f in files} == {
        "tokenyard/v1/worker.proto",
        "tokenyard/v1/picker.proto",
        "tokenyard/v1/admin.proto",
    }
    for file in files:
        assert file.package == "tokenyard.v1"
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }

        def need(path: tuple[int, ...], what: str, comments: dict[tuple[int, ...], str] = comments) -> None:
            if not comments.get(path):
                undocumented.append(what)

        for s_index, service in enumerate(file.service):
            need((_SERVICE, s_index), f"service {service.name}")
            for m_index, method in enumerate(service.method):
                need((_SERVICE, s_index, _SERVICE_METHOD, m_index), f"rpc {service.name}.{method.name}")
        for m_index, message in enumerate(file.message_type):
            need((_MESSAGE_TYPE, m_index), f"message {message.name}")
            for f_index, field in enumerate(message.field):
                need((_MESSAGE_TYPE, m_index, _MESSAGE_FIELD, f_index), f"field {message.name}.{field.name}")
            # map<> fields create synthetic nested entry types, which need no comment.
            assert all(n.options.map_entry for n in message.nested_type), message.name
    assert not undocumented, f"undocumented in proto/: {undocumented}"


def test_contract_shape() -> None:
    from tokenyard.v1 import admin_pb2, picker_pb2, worker_pb2

    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in worker.methods} == {
        "Describe", "Status", "MigrateOut", "MigrateIn", "AbortMigration", "ListMigrations",
    }
    status = worker.methods_by_name["Status"]
    assert status.server_streaming and not status.client_streaming
    assert status.output_type.name == "LoadSnapshot"
    migrate_in = worker.methods_by_name["MigrateIn"]
    assert migrate_in.client_streaming and migrate_in.server_streaming  # the destination acks each stage
    migrate_out = worker.methods_by_name["MigrateOut"]
    assert migrate_out.server_streaming and not migrate_out.client_streaming
    picker = picker_pb2.DESCRIPTOR.services_by_name["Picker"]
    assert [m.name for m in picker.methods] == ["Pick"]
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert {m.name for m in admin.methods} == {
        "GetPolicy", "PutPolicy", "DeletePolicy", "ListPolicies", "ListPools",
        "RegisterInstance", "DeregisterInstance", "DrainInstance", "Heartbeat", "ListInstances",
        # versioned policies (router/policy_admin.py)
        "ApplyPolicy", "GetPolicyVersion", "ListCurrentPolicies", "PolicyHistory", "RollbackPolicy",
        "RemovePolicy", "CreateApiKey", "RotateApiKey", "RevokeApiKey", "ListApiKeys",
        # cordon, an operator's migration, the plan
        "CordonInstance", "TriggerMigration", "GetPlan",
        "RecentRecords",  # request records (router/records_admin.py)
    }
    recent = admin.methods_by_name["RecentRecords"]
    assert recent.server_streaming and not recent.client_streaming and recent.output_type.name == "RecordsChunk"
    # Round trip through the wire format keeps every load field.
    snapshot = worker_pb2.LoadSnapshot(
        instance_id="a", sequence=7, running=3, waiting=2, kv_blocks_used=40, kv_blocks_total=100,
        block_size_tokens=16, tokens_in_flight=600, preemptions_total=1,
        prefix_cache_hit_tokens_total=32, prefix_cache_query_tokens_total=64, draining=True,
        kv_blocks_queued=0, running_by_priority=worker_pb2.RunningByPriority(requests={0: 1, 2: 2}),
    )
    back = worker_pb2.LoadSnapshot.FromString(snapshot.SerializeToString())
    assert back == snapshot and back.HasField("kv_blocks_queued") and back.HasField("running_by_priority")
    assert not worker_pb2.LoadSnapshot.FromString(worker_pb2.LoadSnapshot(running=1).SerializeToString()).HasField(
        "running_by_priority")  # unset stays unset: the router counts no headroom then


@pytest.mark.parametrize(("message", "first_free"), [("EngineDescription", 22), ("LoadSnapshot", 25)])
def test_migration_fields_take_the_numbers_kept_for_them(message: str, first_free: int) -> None:
    """The migration fields use 20-21 (EngineDescription) and 20-24 (LoadSnapshot, 23:
    kv_blocks_queued, 24: running_by_priority); what is left of 20-29 stays reserved."""
    from tokenyard.v1 import worker_pb2

    file = descriptor_pb2.FileDescriptorProto()
    worker_pb2.DESCRIPTOR.CopyToProto(file)
    proto = next(m for m in file.message_type if m.name == message)
    reserved = {n for r in proto.reserved_range for n in range(r.start, r.end)}
    used = {f.number for f in proto.field}
    assert set(range(20, 30)) <= reserved | used
    assert not reserved & used
    assert all(n < 20 or n in range(20, first_free) for n in used)
    assert set(range(20, first_free)) <= used
