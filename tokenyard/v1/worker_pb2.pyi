from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_ERROR_NONE: _ClassVar[MigrationError]
    REQUEST_FINISHED: _ClassVar[MigrationError]
    REQUEST_GONE: _ClassVar[MigrationError]
    REQUEST_PREEMPTED: _ClassVar[MigrationError]
    DESTINATION_OUT_OF_MEMORY: _ClassVar[MigrationError]
    DESTINATION_DRAINING: _ClassVar[MigrationError]
    DESTINATION_UNREACHABLE: _ClassVar[MigrationError]
    SOURCE_UNREACHABLE: _ClassVar[MigrationError]
    TIMEOUT: _ClassVar[MigrationError]
    ABORTED_BY_REQUEST: _ClassVar[MigrationError]
    INCOMPATIBLE: _ClassVar[MigrationError]
    DESTINATION_BUSY: _ClassVar[MigrationError]

class MigrationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_STATE_UNSPECIFIED: _ClassVar[MigrationState]
    PREPARING: _ClassVar[MigrationState]
    RESERVED: _ClassVar[MigrationState]
    PRE_COPY: _ClassVar[MigrationState]
    STAGE_ACKED: _ClassVar[MigrationState]
    STOP_AND_COPY: _ClassVar[MigrationState]
    COMMITTED: _ClassVar[MigrationState]
    ABORTED: _ClassVar[MigrationState]
MIGRATION_ERROR_NONE: MigrationError
REQUEST_FINISHED: MigrationError
REQUEST_GONE: MigrationError
REQUEST_PREEMPTED: MigrationError
DESTINATION_OUT_OF_MEMORY: MigrationError
DESTINATION_DRAINING: MigrationError
DESTINATION_UNREACHABLE: MigrationError
SOURCE_UNREACHABLE: MigrationError
TIMEOUT: MigrationError
ABORTED_BY_REQUEST: MigrationError
INCOMPATIBLE: MigrationError
DESTINATION_BUSY: MigrationError
MIGRATION_STATE_UNSPECIFIED: MigrationState
PREPARING: MigrationState
RESERVED: MigrationState
PRE_COPY: MigrationState
STAGE_ACKED: MigrationState
STOP_AND_COPY: MigrationState
COMMITTED: MigrationState
ABORTED: MigrationState

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineDescription(_message.Message):
    __slots__ = ("instance_id", "model", "gpu", "tensor_parallel", "num_kv_blocks", "block_size_tokens", "kv_bytes_per_token", "max_model_len", "engine_kind", "engine_version", "incarnation_id", "max_num_seqs", "max_num_batched_tokens", "labels", "kv_transfer_backends", "max_concurrent_migrations")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    gpu: str
    tensor_parallel: int
    num_kv_blocks: int
    block_size_tokens: int
    kv_bytes_per_token: int
    max_model_len: int
    engine_kind: str
    engine_version: str
    incarnation_id: str
    max_num_seqs: int
    max_num_batched_tokens: int
    labels: _containers.ScalarMap[str, str]
    kv_transfer_backends: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_migrations: int
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., max_model_len: _Optional[int] = ..., engine_kind: _Optional[str] = ..., engine_version: _Optional[str] = ..., incarnation_id: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., kv_transfer_backends: _Optional[_Iterable[str]] = ..., max_concurrent_migrations: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("interval_ms", "min_change_interval_ms")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_CHANGE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    min_change_interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ..., min_change_interval_ms: _Optional[int] = ...) -> None: ...

class LoadSnapshot(_message.Message):
    __slots__ = ("instance_id", "sequence", "timestamp_unix_ms", "running", "waiting", "kv_blocks_used", "kv_blocks_total", "block_size_tokens", "tokens_in_flight", "preemptions_total", "prefix_cache_hit_tokens_total", "prefix_cache_query_tokens_total", "draining", "incarnation_id", "migrations_out", "migrations_in", "kv_blocks_reserved_for_migration", "kv_blocks_queued", "running_by_priority")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERY_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_OUT_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_RESERVED_FOR_MIGRATION_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    sequence: int
    timestamp_unix_ms: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size_tokens: int
    tokens_in_flight: int
    preemptions_total: int
    prefix_cache_hit_tokens_total: int
    prefix_cache_query_tokens_total: int
    draining: bool
    incarnation_id: str
    migrations_out: int
    migrations_in: int
    kv_blocks_reserved_for_migration: int
    kv_blocks_queued: int
    running_by_priority: RunningByPriority
    def __init__(self, instance_id: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp_unix_ms: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., tokens_in_flight: _Optional[int] = ..., preemptions_total: _Optional[int] = ..., prefix_cache_hit_tokens_total: _Optional[int] = ..., prefix_cache_query_tokens_total: _Optional[int] = ..., draining: _Optional[bool] = ..., incarnation_id: _Optional[str] = ..., migrations_out: _Optional[int] = ..., migrations_in: _Optional[int] = ..., kv_blocks_reserved_for_migration: _Optional[int] = ..., kv_blocks_queued: _Optional[int] = ..., running_by_priority: _Optional[_Union[RunningByPriority, _Mapping]] = ...) -> None: ...

class RunningByPriority(_message.Message):
    __slots__ = ("requests",)
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.ScalarMap[int, int]
    def __init__(self, requests: _Optional[_Mapping[int, int]] = ...) -> None: ...

class MigrateOutRequest(_message.Message):
    __slots__ = ("migration_id", "request_id", "destination_instance_id", "destination_address", "max_stages", "stop_copy_max_blocks", "stage_timeout_ms", "deadline_ms", "attach_timeout_ms")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_STAGES_FIELD_NUMBER: _ClassVar[int]
    STOP_COPY_MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ATTACH_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    destination_instance_id: str
    destination_address: str
    max_stages: int
    stop_copy_max_blocks: int
    stage_timeout_ms: int
    deadline_ms: int
    attach_timeout_ms: int
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., destination_address: _Optional[str] = ..., max_stages: _Optional[int] = ..., stop_copy_max_blocks: _Optional[int] = ..., stage_timeout_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., attach_timeout_ms: _Optional[int] = ...) -> None: ...

class MigrationProgress(_message.Message):
    __slots__ = ("migration_id", "state", "stage", "blocks_copied", "bytes_copied", "tokens_generated", "error", "error_message", "suspended_us", "destination_request_id")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_US_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: MigrationState
    stage: int
    blocks_copied: int
    bytes_copied: int
    tokens_generated: int
    error: MigrationError
    error_message: str
    suspended_us: int
    destination_request_id: str
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., stage: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., error: _Optional[_Union[MigrationError, str]] = ..., error_message: _Optional[str] = ..., suspended_us: _Optional[int] = ..., destination_request_id: _Optional[str] = ...) -> None: ...

class MigrateInBegin(_message.Message):
    __slots__ = ("migration_id", "request_id", "source_instance_id", "destination_instance_id", "model", "block_size_tokens", "kv_bytes_per_token", "prompt_tokens", "tokens_generated", "max_tokens", "engine_state", "priority", "kv_transfer_backend")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    source_instance_id: str
    destination_instance_id: str
    model: str
    block_size_tokens: int
    kv_bytes_per_token: int
    prompt_tokens: int
    tokens_generated: int
    max_tokens: int
    engine_state: bytes
    priority: int
    kv_transfer_backend: str
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., source_instance_id: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., model: _Optional[str] = ..., block_size_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., max_tokens: _Optional[int] = ..., engine_state: _Optional[bytes] = ..., priority: _Optional[int] = ..., kv_transfer_backend: _Optional[str] = ...) -> None: ...

class KVBlocks(_message.Message):
    __slots__ = ("stage", "block_ids", "data", "tokens_covered", "last_of_stage", "final")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COVERED_FIELD_NUMBER: _ClassVar[int]
    LAST_OF_STAGE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    stage: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    tokens_covered: int
    last_of_stage: bool
    final: bool
    def __init__(self, stage: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., tokens_covered: _Optional[int] = ..., last_of_stage: _Optional[bool] = ..., final: _Optional[bool] = ...) -> None: ...

class MigrateInCommit(_message.Message):
    __slots__ = ("tokens_generated", "context_tokens", "blocks_total")
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    tokens_generated: int
    context_tokens: int
    blocks_total: int
    def __init__(self, tokens_generated: _Optional[int] = ..., context_tokens: _Optional[int] = ..., blocks_total: _Optional[int] = ...) -> None: ...

class MigrateInAbort(_message.Message):
    __slots__ = ("error", "error_message")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    error: MigrationError
    error_message: str
    def __init__(self, error: _Optional[_Union[MigrationError, str]] = ..., error_message: _Optional[str] = ...) -> None: ...

class MigrateInChunk(_message.Message):
    __slots__ = ("begin", "blocks", "commit", "abort")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    begin: MigrateInBegin
    blocks: KVBlocks
    commit: MigrateInCommit
    abort: MigrateInAbort
    def __init__(self, begin: _Optional[_Union[MigrateInBegin, _Mapping]] = ..., blocks: _Optional[_Union[KVBlocks, _Mapping]] = ..., commit: _Optional[_Union[MigrateInCommit, _Mapping]] = ..., abort: _Optional[_Union[MigrateInAbort, _Mapping]] = ...) -> None: ...

class MigrateInResult(_message.Message):
    __slots__ = ("migration_id", "state", "stage", "blocks_received", "blocks_reserved", "error", "error_message", "destination_request_id")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: MigrationState
    stage: int
    blocks_received: int
    blocks_reserved: int
    error: MigrationError
    error_message: str
    destination_request_id: str
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., stage: _Optional[int] = ..., blocks_received: _Optional[int] = ..., blocks_reserved: _Optional[int] = ..., error: _Optional[_Union[MigrationError, str]] = ..., error_message: _Optional[str] = ..., destination_request_id: _Optional[str] = ...) -> None: ...

class AbortMigrationRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortMigrationResult(_message.Message):
    __slots__ = ("found", "aborted", "state")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    aborted: bool
    state: MigrationState
    def __init__(self, found: _Optional[bool] = ..., aborted: _Optional[bool] = ..., state: _Optional[_Union[MigrationState, str]] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ("include_candidates", "max_candidates")
    INCLUDE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    include_candidates: bool
    max_candidates: int
    def __init__(self, include_candidates: _Optional[bool] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class MigrationInfo(_message.Message):
    __slots__ = ("migration_id", "request_id", "role", "peer_instance_id", "state", "stage", "blocks_copied", "started_unix_ms", "error")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PEER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    role: str
    peer_instance_id: str
    state: MigrationState
    stage: int
    blocks_copied: int
    started_unix_ms: int
    error: MigrationError
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., role: _Optional[str] = ..., peer_instance_id: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., stage: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., error: _Optional[_Union[MigrationError, str]] = ...) -> None: ...

class MigrationCandidate(_message.Message):
    __slots__ = ("request_id", "context_tokens", "tokens_generated", "priority", "max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context_tokens: int
    tokens_generated: int
    priority: int
    max_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., context_tokens: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., priority: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class ListMigrationsResponse(_message.Message):
    __slots__ = ("migrations", "candidates")
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    candidates: _containers.RepeatedCompositeFieldContainer[MigrationCandidate]
    def __init__(self, migrations: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[MigrationCandidate, _Mapping]]] = ...) -> None: ...
