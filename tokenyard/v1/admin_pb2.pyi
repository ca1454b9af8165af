from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SloPolicy(_message.Message):
    __slots__ = ("tenant", "slo_class", "ttft_slo_ms", "tpot_slo_ms", "priority", "dispatch_policy")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_POLICY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    slo_class: str
    ttft_slo_ms: float
    tpot_slo_ms: float
    priority: int
    dispatch_policy: str
    def __init__(self, tenant: _Optional[str] = ..., slo_class: _Optional[str] = ..., ttft_slo_ms: _Optional[float] = ..., tpot_slo_ms: _Optional[float] = ..., priority: _Optional[int] = ..., dispatch_policy: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class PutPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: SloPolicy
    def __init__(self, policy: _Optional[_Union[SloPolicy, _Mapping]] = ...) -> None: ...

class DeletePolicyRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class DeletePolicyResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[SloPolicy]
    def __init__(self, policies: _Optional[_Iterable[_Union[SloPolicy, _Mapping]]] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "gpu", "model", "tensor_parallel", "desired_count", "ready_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    DESIRED_COUNT_FIELD_NUMBER: _ClassVar[int]
    READY_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    gpu: str
    model: str
    tensor_parallel: int
    desired_count: int
    ready_count: int
    def __init__(self, name: _Optional[str] = ..., gpu: _Optional[str] = ..., model: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., desired_count: _Optional[int] = ..., ready_count: _Optional[int] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class InstanceRegistration(_message.Message):
    __slots__ = ("instance_id", "url", "model", "gpu", "pool", "tensor_parallel", "labels", "worker_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    url: str
    model: str
    gpu: str
    pool: str
    tensor_parallel: int
    labels: _containers.ScalarMap[str, str]
    worker_address: str
    def __init__(self, instance_id: _Optional[str] = ..., url: _Optional[str] = ..., model: _Optional[str] = ..., gpu: _Optional[str] = ..., pool: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., worker_address: _Optional[str] = ...) -> None: ...

class RegisterInstanceRequest(_message.Message):
    __slots__ = ("instance", "lease_ttl_ms")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceRegistration
    lease_ttl_ms: int
    def __init__(self, instance: _Optional[_Union[InstanceRegistration, _Mapping]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class RegisterInstanceResponse(_message.Message):
    __slots__ = ("lease_ttl_ms",)
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_ms: int
    def __init__(self, lease_ttl_ms: _Optional[int] = ...) -> None: ...

class DeregisterInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DeregisterInstanceResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class DrainInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "draining")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    draining: bool
    def __init__(self, instance_id: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class DrainInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_ms",)
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_ms: int
    def __init__(self, lease_ttl_ms: _Optional[int] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("pool", "model")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    model: str
    def __init__(self, pool: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("registration", "source", "healthy", "draining", "running", "waiting", "kv_blocks_used", "kv_blocks_total", "router_inflight", "load_updated_unix_ms", "lease_expires_unix_ms", "cordon")
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUTER_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CORDON_FIELD_NUMBER: _ClassVar[int]
    registration: InstanceRegistration
    source: str
    healthy: bool
    draining: bool
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    router_inflight: int
    load_updated_unix_ms: int
    lease_expires_unix_ms: int
    cordon: CordonInfo
    def __init__(self, registration: _Optional[_Union[InstanceRegistration, _Mapping]] = ..., source: _Optional[str] = ..., healthy: _Optional[bool] = ..., draining: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., router_inflight: _Optional[int] = ..., load_updated_unix_ms: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ..., cordon: _Optional[_Union[CordonInfo, _Mapping]] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ...) -> None: ...

class PolicyVersion(_message.Message):
    __slots__ = ("name", "version", "spec_json", "author", "created_unix_ms", "reason", "diff", "deleted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    spec_json: str
    author: str
    created_unix_ms: int
    reason: str
    diff: str
    deleted: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., spec_json: _Optional[str] = ..., author: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ..., diff: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("name", "spec_json", "expected_version", "reason", "dry_run")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    expected_version: int
    reason: str
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("policy", "changed", "dry_run")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    policy: PolicyVersion
    changed: bool
    dry_run: bool
    def __init__(self, policy: _Optional[_Union[PolicyVersion, _Mapping]] = ..., changed: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetPolicyVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListCurrentPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCurrentPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyVersion]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyVersion, _Mapping]]] = ...) -> None: ...

class PolicyHistoryRequest(_message.Message):
    __slots__ = ("name", "limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit: int
    def __init__(self, name: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class PolicyHistoryResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[PolicyVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[PolicyVersion, _Mapping]]] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ("name", "to_version", "expected_version", "reason", "dry_run")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    to_version: int
    expected_version: int
    reason: str
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., to_version: _Optional[int] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RemovePolicyRequest(_message.Message):
    __slots__ = ("name", "expected_version", "reason", "dry_run")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_version: int
    reason: str
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("key_id", "tenant", "created_unix_ms", "revoked_unix_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    created_unix_ms: int
    revoked_unix_ms: int
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., revoked_unix_ms: _Optional[int] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ApiKeyCreated(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKeyInfo
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class RotateApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class CordonInfo(_message.Message):
    __slots__ = ("by", "at_unix_ms", "reason")
    BY_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    by: str
    at_unix_ms: int
    reason: str
    def __init__(self, by: _Optional[str] = ..., at_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CordonInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "cordoned", "reason")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    cordoned: bool
    reason: str
    def __init__(self, instance_id: _Optional[str] = ..., cordoned: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CordonInstanceResponse(_message.Message):
    __slots__ = ("instance", "cordon", "changed")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CORDON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    cordon: CordonInfo
    changed: bool
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ..., cordon: _Optional[_Union[CordonInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class TriggerMigrationRequest(_message.Message):
    __slots__ = ("source_instance_id", "destination_instance_id", "request_id", "reason")
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    source_instance_id: str
    destination_instance_id: str
    request_id: str
    reason: str
    def __init__(self, source_instance_id: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TriggerMigrationResponse(_message.Message):
    __slots__ = ("migration_id", "request_id", "source_instance_id", "destination_instance_id", "committed", "state", "error", "error_message", "blocks_copied", "suspended_us", "duration_ms")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_US_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    source_instance_id: str
    destination_instance_id: str
    committed: bool
    state: str
    error: str
    error_message: str
    blocks_copied: int
    suspended_us: int
    duration_ms: float
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., source_instance_id: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., committed: _Optional[bool] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., error_message: _Optional[str] = ..., blocks_copied: _Optional[int] = ..., suspended_us: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanPool(_message.Message):
    __slots__ = ("name", "gpu", "tensor_parallel", "replicas_current", "replicas_target", "planned_instances", "usd_per_hour", "load_instances", "draining")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    PLANNED_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    LOAD_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    name: str
    gpu: str
    tensor_parallel: int
    replicas_current: int
    replicas_target: int
    planned_instances: int
    usd_per_hour: float
    load_instances: float
    draining: int
    def __init__(self, name: _Optional[str] = ..., gpu: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., replicas_current: _Optional[int] = ..., replicas_target: _Optional[int] = ..., planned_instances: _Optional[int] = ..., usd_per_hour: _Optional[float] = ..., load_instances: _Optional[float] = ..., draining: _Optional[int] = ...) -> None: ...

class PlanRoute(_message.Message):
    __slots__ = ("slo_class", "input_lo", "input_hi", "output_lo", "output_hi", "rate_rps", "pool_shares")
    class PoolSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    INPUT_LO_FIELD_NUMBER: _ClassVar[int]
    INPUT_HI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LO_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HI_FIELD_NUMBER: _ClassVar[int]
    RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    POOL_SHARES_FIELD_NUMBER: _ClassVar[int]
    slo_class: str
    input_lo: int
    input_hi: int
    output_lo: int
    output_hi: int
    rate_rps: float
    pool_shares: _containers.ScalarMap[str, float]
    def __init__(self, slo_class: _Optional[str] = ..., input_lo: _Optional[int] = ..., input_hi: _Optional[int] = ..., output_lo: _Optional[int] = ..., output_hi: _Optional[int] = ..., rate_rps: _Optional[float] = ..., pool_shares: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PlanStatus(_message.Message):
    __slots__ = ("pools", "routes", "usd_per_hour", "solved_unix_ms", "updated_unix_ms", "leader", "solver", "solve_s", "route_by", "rank_noise_sd", "rank_tau")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    SOLVED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SOLVE_S_FIELD_NUMBER: _ClassVar[int]
    ROUTE_BY_FIELD_NUMBER: _ClassVar[int]
    RANK_NOISE_SD_FIELD_NUMBER: _ClassVar[int]
    RANK_TAU_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PlanPool]
    routes: _containers.RepeatedCompositeFieldContainer[PlanRoute]
    usd_per_hour: float
    solved_unix_ms: int
    updated_unix_ms: int
    leader: str
    solver: str
    solve_s: float
    route_by: str
    rank_noise_sd: float
    rank_tau: float
    def __init__(self, pools: _Optional[_Iterable[_Union[PlanPool, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[PlanRoute, _Mapping]]] = ..., usd_per_hour: _Optional[float] = ..., solved_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., leader: _Optional[str] = ..., solver: _Optional[str] = ..., solve_s: _Optional[float] = ..., route_by: _Optional[str] = ..., rank_noise_sd: _Optional[float] = ..., rank_tau: _Optional[float] = ...) -> None: ...

class RecentRecordsRequest(_message.Message):
    __slots__ = ("window_s", "max_records", "max_bytes")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    max_records: int
    max_bytes: int
    def __init__(self, window_s: _Optional[float] = ..., max_records: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class RecordsChunk(_message.Message):
    __slots__ = ("records_json", "truncated", "total", "source")
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    records_json: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    total: int
    source: str
    def __init__(self, records_json: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ..., total: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...
