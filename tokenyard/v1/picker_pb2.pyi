from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PickRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "api_key", "slo_class", "session_id", "estimated_prompt_tokens", "max_output_tokens", "prefix_block_hashes", "prefix_block_tokens", "headers", "exclude_instance_ids", "prompt")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    api_key: str
    slo_class: str
    session_id: str
    estimated_prompt_tokens: int
    max_output_tokens: int
    prefix_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    prefix_block_tokens: int
    headers: _containers.ScalarMap[str, str]
    exclude_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    prompt: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., api_key: _Optional[str] = ..., slo_class: _Optional[str] = ..., session_id: _Optional[str] = ..., estimated_prompt_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., prefix_block_hashes: _Optional[_Iterable[int]] = ..., prefix_block_tokens: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., exclude_instance_ids: _Optional[_Iterable[str]] = ..., prompt: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("instance_id", "address", "pool", "gpu", "model")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    pool: str
    gpu: str
    model: str
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ..., gpu: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class PickResponse(_message.Message):
    __slots__ = ("endpoints", "priority", "tier", "model", "reason", "tenant", "slo_class")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    priority: int
    tier: str
    model: str
    reason: str
    tenant: str
    slo_class: str
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., priority: _Optional[int] = ..., tier: _Optional[str] = ..., model: _Optional[str] = ..., reason: _Optional[str] = ..., tenant: _Optional[str] = ..., slo_class: _Optional[str] = ...) -> None: ...
