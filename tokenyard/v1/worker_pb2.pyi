from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineDescription(_message.Message):
    __slots__ = ("instance_id", "model", "gpu", "tensor_parallel", "num_kv_blocks", "block_size_tokens", "kv_bytes_per_token", "max_model_len", "engine_kind", "engine_version", "incarnation_id", "max_num_seqs", "max_num_batched_tokens", "labels")
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
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., max_model_len: _Optional[int] = ..., engine_kind: _Optional[str] = ..., engine_version: _Optional[str] = ..., incarnation_id: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("interval_ms", "min_change_interval_ms")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_CHANGE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    min_change_interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ..., min_change_interval_ms: _Optional[int] = ...) -> None: ...

class LoadSnapshot(_message.Message):
    __slots__ = ("instance_id", "sequence", "timestamp_unix_ms", "running", "waiting", "kv_blocks_used", "kv_blocks_total", "block_size_tokens", "tokens_in_flight", "preemptions_total", "prefix_cache_hit_tokens_total", "prefix_cache_query_tokens_total", "draining", "incarnation_id")
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
    def __init__(self, instance_id: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp_unix_ms: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., tokens_in_flight: _Optional[int] = ..., preemptions_total: _Optional[int] = ..., prefix_cache_hit_tokens_total: _Optional[int] = ..., prefix_cache_query_tokens_total: _Optional[int] = ..., draining: _Optional[bool] = ..., incarnation_id: _Optional[str] = ...) -> None: ...
