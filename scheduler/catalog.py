"""GPU and model catalogs: the hardware and architecture facts the engine model needs.

Names are stable, case-insensitive ids (`A100-80GB`, `llama-3-8b`). Users extend or
override entries in YAML (`load_catalog_yaml`), and a model can be described by the
architecture fields of a HuggingFace `config.json` (`model_from_hf_config`).
Prices are on-demand list prices in USD per GPU-hour, meant as defaults to override.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.catalog_models import HF_CONFIGS


class CatalogError(ValueError):
    """An unknown name or an invalid catalog entry; the message lists what is allowed."""


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak
    hbm_gbps: float  # device memory bandwidth, GB/s
    interconnect: str  # "nvlink" or "pcie"
    interconnect_gbps: float  # per-GPU bidirectional bandwidth used by tensor-parallel all-reduce
    usd_per_hour: float


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_params: float  # all parameters (weights held in memory)
    active_params: float  # parameters touched per token (== num_params unless MoE)
    dtype_bytes: int = 2
    max_context_tokens: int = 8192
    num_experts: int = 1
    experts_per_token: int = 1
    gated_mlp: bool = True  # SwiGLU-style up+gate+down (Llama); False: up+down (BLOOM, phi-2)
    # config.json `head_dim` where it is not hidden / heads (Gemma, Qwen3, Mistral-Nemo); 0: derived.
    head_dim_size: int = 0
    # Always-active shared-expert MLP width (DeepSeek `n_shared_experts x moe_intermediate_size`,
    # Qwen2-MoE `shared_expert_intermediate_size`); 0: none.
    shared_intermediate_size: int = 0
    # KV-cache elements per token per layer where it is not 2 x kv_heads x head_dim: multi-head
    # latent attention caches one compressed vector (DeepSeek `kv_lora_rank + qk_rope_head_dim`).
    kv_cache_dim: int = 0
    hf_id: str = ""  # the HuggingFace repository whose config.json the fields come from
    source: str = ""  # where the architecture fields come from

    @property
    def head_dim(self) -> int:
        return self.head_dim_size or self.hidden_size // self.num_attention_heads

    @property
    def attention_params_per_layer(self) -> int:
        """Q, K, V and output projection weights of one layer."""
        return self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_kv_heads)

    @property
    def mlp_params_per_expert_per_layer(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def shared_mlp_params_per_layer(self) -> int:
        """Weights of the always-active shared experts of one MoE layer (0 for dense models)."""
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.shared_intermediate_size

    @property
    def active_linear_params_per_layer(self) -> int:
        """Weights one token multiplies in one layer (attention + its experts' MLPs)."""
        return (
            self.attention_params_per_layer
            + self.experts_per_token * self.mlp_params_per_expert_per_layer
            + self.shared_mlp_params_per_layer
        )

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        per_layer = self.kv_cache_dim or 2 * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


_BUILTIN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("A10G", 24, 70.0, 600, "pcie", 32, 1.01),
    GpuSpec("L4", 24, 121.0, 300, "pcie", 32, 0.70),
    GpuSpec("L40S", 48, 362.0, 864, "pcie", 32, 1.96),
    GpuSpec("A100-40GB", 40, 312.0, 1555, "nvlink", 600, 3.00),
    GpuSpec("A100-80GB", 80, 312.0, 2039, "nvlink", 600, 3.67),
    GpuSpec("H100-80GB", 80, 989.0, 3350, "nvlink", 900, 7.52),
    GpuSpec("H200", 141, 989.0, 4800, "nvlink", 900, 9.10),
)

_BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8.03e9, 8.03e9, max_context_tokens=8192),
    ModelSpec("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, 70.6e9, 70.6e9, max_context_tokens=8192),
    ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 6.74e9, 6.74e9, max_context_tokens=4096),
    ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 69.0e9, 69.0e9, max_context_tokens=4096),
    ModelSpec("codellama-34b", 48, 8192, 64, 8, 22016, 32000, 33.7e9, 33.7e9, max_context_tokens=16384),
    ModelSpec(
        "phi-2", 32, 2560, 32, 32, 10240, 51200, 2.78e9, 2.78e9, max_context_tokens=2048, gated_mlp=False
    ),
    ModelSpec("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, 0.494e9, 0.494e9, max_context_tokens=32768),
    ModelSpec("qwen2.5-1.5b", 28, 1536, 12, 2, 8960, 151936, 1.54e9, 1.54e9, max_context_tokens=32768),
    ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, 7.62e9, 7.62e9, max_context_tokens=32768),
    ModelSpec(
        "mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 46.7e9, 12.9e9,
        max_context_tokens=32768, num_experts=8, experts_per_token=2,
    ),
    # Measured in the Splitwise performance model (shared/data/perf/splitwise_sim).
    ModelSpec(
        "bloom-176b", 70, 14336, 112, 112, 57344, 250880, 176.2e9, 176.2e9,
        max_context_tokens=2048, gated_mlp=False,
    ),
    # In the TensorRT-LLM throughput tables (shared/data/perf/trtllm_perf_overview).
    ModelSpec("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256, 405.9e9, 405.9e9, max_context_tokens=131072),
)


def tensor_parallel_problem(model: ModelSpec, tp: int) -> str | None:
    """Why `model` cannot run at tensor-parallel degree `tp`, or None: vLLM shards the
    attention heads over the GPUs and refuses a degree that does not divide their number."""
    heads = model.num_attention_heads
    if tp >= 1 and heads % tp == 0:
        return None
    fits = [d for d in (1, 2, 4, 8, 16) if heads % d == 0]
    return (f"{model.name} has {heads} attention heads, which tp {tp} does not divide (vLLM refuses it); "
            f"expected one of {', '.join(map(str, fits))}")


def normalise_model_id(name: str) -> str:
    """The lookup key of a model name or HuggingFace id: lower case, organisation and the
    instruction-tuning / packaging suffixes dropped (`meta-llama/Llama-3.1-8B-Instruct` ->
    `llama-3.1-8b`), so serving logs and benchmark files that name the HF repository resolve."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    for prefix in ("meta-",):
        if key.startswith(prefix) and key[len(prefix):].startswith("llama"):
            key = key[len(prefix):]
    changed = True
    while changed:
        changed = False
        for suffix in ("-instruct", "-chat", "-hf", "-it", "-base", "-v0.1", "-v0.2", "-v0.3", "-2407",
                       "-2409", "-2501", "-4k", "-8k", "-128k", "-fp8", "-awq", "-gptq"):
            if key.endswith(suffix):
                key = key[: -len(suffix)]
                changed = True
    return key


# HuggingFace repositories of the hand-written entries above (their config.json fields).
_BUILTIN_HF_IDS: dict[str, str] = {
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "codellama-34b": "codellama/CodeLlama-34b-hf",
    "phi-2": "microsoft/phi-2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "bloom-176b": "bigscience/bloom",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
}


@dataclass(slots=True)
class Catalog:
    """Known GPUs and models, keyed by lower-cased name; models also by their HF ids."""

    gpus: dict[str, GpuSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # normalised id -> model name (lower)

    def gpu(self, name: str) -> GpuSpec:
        found = self.gpus.get(name.lower())
        if found is None:
            known = ", ".join(sorted(g.name for g in self.gpus.values()))
            raise CatalogError(f"unknown GPU {name!r}; known GPUs: {known}")
        return found

    def model(self, name: str) -> ModelSpec:
        found = self.find_model(name)
        if found is None:
            known = ", ".join(sorted(m.name for m in self.models.values()))
            raise CatalogError(f"unknown model {name!r}; known models: {known}")
        return found

    def find_model(self, name: str) -> ModelSpec | None:
        """The model named `name` (catalog name or HuggingFace id, any case), or None."""
        found = self.models.get(name.lower())
        if found is None:
            target = self.aliases.get(normalise_model_id(name))
            found = self.models.get(target) if target else None
        return found

    def add_gpu(self, spec: GpuSpec) -> None:
        self.gpus[spec.name.lower()] = spec

    def add_model(self, spec: ModelSpec) -> None:
        self.models[spec.name.lower()] = spec
        self.aliases.setdefault(normalise_model_id(spec.name), spec.name.lower())
        if spec.hf_id:
            self.aliases[normalise_model_id(spec.hf_id)] = spec.name.lower()

    def copy(self) -> Catalog:
        return Catalog(dict(self.gpus), dict(self.models), dict(self.aliases))


def default_catalog() -> Catalog:
    catalog = Catalog()
    for gpu in _BUILTIN_GPUS:
        catalog.add_gpu(gpu)
    for model in _BUILTIN_MODELS:
        catalog.add_model(replace(model, hf_id=_BUILTIN_HF_IDS.get(model.name, "")))
    for name, hf_id, config in HF_CONFIGS:
        spec = model_from_hf_config(name, config, where=f"catalog {name}")
        catalog.add_model(replace(spec, hf_id=hf_id, source=f"{hf_id} config.json"))
    return catalog


_GPU_FIELDS: dict[str, type] = {
    "memory_gib": float,
    "bf16_tflops": float,
    "hbm_gbps": float,
    "interconnect": str,
    "interconnect_gbps": float,
    "usd_per_hour": float,
}
_MODEL_FIELDS: dict[str, type] = {
    "num_layers": int,
    "hidden_size": int,
    "num_attention_heads": int,
    "num_kv_heads": int,
    "intermediate_size": int,
    "vocab_size": int,
    "num_params": float,
    "active_params": float,
    "dtype_bytes": int,
    "max_context_tokens": int,
    "num_experts": int,
    "experts_per_token": int,
    "gated_mlp": bool,
}


def _coerce(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise CatalogError(f"{where}.{key}: expected a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise CatalogError(f"{where}.{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogError(f"{where}.{key}: expected a number, got {value!r}")
    if value <= 0:
        raise CatalogError(f"{where}.{key}: expected a positive number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise CatalogError(f"{where}.{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _check_keys(where: str, entry: Mapping[str, Any], allowed: Mapping[str, type]) -> None:
    unknown = sorted(set(entry) - set(allowed) - {"name", "hf_config"})
    if unknown:
        raise CatalogError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def estimate_num_params(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
    num_experts: int = 1,
    tied_embeddings: bool = False,
    gated_mlp: bool = True,
    head_dim: int = 0,
    shared_intermediate_size: int = 0,
) -> float:
    """Parameter count of a decoder-only transformer (Llama-style when `gated_mlp`).

    Norms and biases are left out: they are far below 1% of the weights.
    """
    head_dim = head_dim or hidden_size // num_attention_heads
    attn = hidden_size * head_dim * (2 * num_attention_heads + 2 * num_kv_heads)
    per_matrix = 3 if gated_mlp else 2
    mlp = per_matrix * hidden_size * (intermediate_size * num_experts + shared_intermediate_size)
    embed = vocab_size * hidden_size * (1 if tied_embeddings else 2)
    return float(num_layers * (attn + mlp) + embed)


# HuggingFace architectures whose MLP is up -> activation -> down (no gate projection).
_NON_GATED_MODEL_TYPES = frozenset(
    {"bloom", "phi", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon", "starcoder2", "mpt"}
)
# Field names differ between architectures; the first one present wins.
_HF_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embed", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads"),
    "vocab_size": ("vocab_size",),
}


def _first_int(config: Mapping[str, Any], where: str, keys: tuple[str, ...]) -> int | None:
    key = next((k for k in keys if config.get(k)), None)
    return _coerce(where, key, config[key], int) if key else None


def _moe_fields(config: Mapping[str, Any], where: str) -> tuple[int, int, int | None, int]:
    """(routed experts, experts per token, expert MLP width or None, shared MLP width):
    Mixtral `num_local_experts`, Qwen-MoE `num_experts` + `shared_expert_intermediate_size`,
    DeepSeek `n_routed_experts` + `n_shared_experts` (each `moe_intermediate_size` wide)."""
    experts = _first_int(config, where, ("num_local_experts", "num_experts", "n_routed_experts")) or 1
    if experts <= 1:
        return 1, 1, None, 0
    per_token = _first_int(config, where, ("num_experts_per_tok",)) or 1
    expert_width = _first_int(config, where, ("moe_intermediate_size",))
    shared = _first_int(config, where, ("shared_expert_intermediate_size",)) or 0
    if not shared and config.get("n_shared_experts") and expert_width:
        shared = _coerce(where, "n_shared_experts", config["n_shared_experts"], int) * expert_width
    return experts, per_token, expert_width, shared


def model_from_hf_config(name: str, config: Mapping[str, Any], where: str | None = None) -> ModelSpec:
    """Build a ModelSpec from the architecture fields of a HuggingFace `config.json`.

    Understands Llama/Mistral/Qwen2/Qwen3/Gemma/Mixtral/DeepSeek field names and the GPT-style
    ones (`n_layer`, `n_embed`, `n_head`, as BLOOM writes them); a model without
    `intermediate_size` gets the classic 4 x hidden MLP; an explicit `head_dim` (Gemma,
    Qwen3) is kept; multi-head latent attention (`kv_lora_rank`) caches one compressed
    vector per token and layer. `where` names the entry in errors.
    """
    where = where or f"model {name!r} hf_config"
    if not isinstance(config, Mapping):
        raise CatalogError(f"{where}: expected the mapping of a config.json, got {type(config).__name__}")
    found: dict[str, Any] = {}
    missing: list[str] = []
    for key, aliases in _HF_ALIASES.items():
        present = next((a for a in aliases if a in config), None)
        if present is None:
            missing.append(" or ".join(aliases))
        else:
            found[key] = _coerce(where, present, config[present], int)
    if missing:
        raise CatalogError(f"{where}: missing field(s) {', '.join(missing)}")
    layers = found["num_hidden_layers"]
    hidden = found["hidden_size"]
    heads = found["num_attention_heads"]
    vocab = found["vocab_size"]
    kv_key = next((k for k in ("num_key_value_heads", "num_kv_heads", "multi_query_group_num") if k in config), None)
    kv_heads = _coerce(where, kv_key, config[kv_key], int) if kv_key else heads
    inter = _first_int(config, where, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * hidden
    model_type = str(config.get("model_type", "")).lower()
    gated = model_type not in _NON_GATED_MODEL_TYPES
    experts, per_token, expert_width, shared = _moe_fields(config, where)
    if expert_width:
        inter = expert_width
    head_dim = _first_int(config, where, ("head_dim",)) or 0
    if head_dim == hidden // heads:
        head_dim = 0
    kv_cache_dim = 0
    if config.get("kv_lora_rank"):
        kv_cache_dim = _coerce(where, "kv_lora_rank", config["kv_lora_rank"], int) + int(
            config.get("qk_rope_head_dim") or 0
        )
    dtype = str(config.get("torch_dtype", "bfloat16"))
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}.get(dtype, 2)
    tied = bool(config.get("tie_word_embeddings", False))
    arch = (layers, hidden, heads, kv_heads, inter, vocab)
    total = estimate_num_params(*arch, experts, tied, gated, head_dim, shared)
    active = estimate_num_params(*arch, per_token, tied, gated, head_dim, shared)
    max_context = config.get("max_position_embeddings", config.get("seq_length", 8192))
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        num_params=total,
        active_params=active,
        dtype_bytes=dtype_bytes,
        max_context_tokens=int(max_context) if isinstance(max_context, int) and max_context > 0 else 8192,
        num_experts=experts,
        experts_per_token=per_token,
        gated_mlp=gated,
        head_dim_size=head_dim,
        shared_intermediate_size=shared,
        kv_cache_dim=kv_cache_dim,
    )


def extend_catalog(catalog: Catalog, document: Mapping[str, Any], source: str = "<yaml>") -> Catalog:
    """Return a copy of `catalog` with the `gpus:` and `models:` entries of a parsed YAML document.

    An entry whose name is already known overrides only the fields it sets (e.g. a price).
    A new model may give `hf_config:` (the dict of a HuggingFace config.json) instead of fields.
    """
    if not isinstance(document, Mapping):
        raise CatalogError(f"{source}: expected a mapping with keys 'gpus' and/or 'models'")
    unknown = sorted(set(document) - {"gpus", "models"})
    if unknown:
        raise CatalogError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed: gpus, models")
    result = catalog.copy()
    for index, entry in enumerate(document.get("gpus") or []):
        where = f"{source}: gpus[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise CatalogError(f"{where}: expected a mapping with a string 'name'")
        _check_keys(where, entry, _GPU_FIELDS)
        values = {k: _coerce(where, k, v, _GPU_FIELDS[k]) for k, v in entry.items() if k != "name"}
        existing = result.gpus.get(entry["name"].lower())
        if existing is not None:
            result.add_gpu(replace(existing, **values))
        else:
            missing = sorted(set(_GPU_FIELDS) - set(values))
            if missing:
                raise CatalogError(f"{where}: new GPU {entry['name']!r} is missing {', '.join(missing)}")
            result.add_gpu(GpuSpec(name=entry["name"], **values))
    for index, entry in enumerate(document.get("models") or []):
        where = f"{source}: models[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise CatalogError(f"{where}: expected a mapping with a string 'name'")
        _check_keys(where, entry, _MODEL_FIELDS)
        name = entry["name"]
        values = {
            k: _coerce(where, k, v, _MODEL_FIELDS[k])
            for k, v in entry.items()
            if k not in ("name", "hf_config")
        }
        if "hf_config" in entry:
            # Fields given next to hf_config (say max_context_tokens) override what it implies.
            base = model_from_hf_config(name, entry["hf_config"], where=f"{where}.hf_config")
            result.add_model(replace(base, **values))
            continue
        existing_model = result.models.get(name.lower())
        if existing_model is not None:
            result.add_model(replace(existing_model, **values))
            continue
        optional = {"active_params", "dtype_bytes", "max_context_tokens", "num_experts",
                    "experts_per_token", "num_params", "gated_mlp"}
        required = set(_MODEL_FIELDS) - optional
        missing = sorted(required - set(values))
        if missing:
            raise CatalogError(f"{where}: new model {name!r} is missing {', '.join(missing)}")
        arch = (values["num_layers"], values["hidden_size"], values["num_attention_heads"],
                values["num_kv_heads"], values["intermediate_size"], values["vocab_size"])
        gated = values.get("gated_mlp", True)
        if "num_params" not in values:
            values["num_params"] = estimate_num_params(
                *arch, values.get("num_experts", 1), gated_mlp=gated
            )
        if "active_params" not in values:
            values["active_params"] = (
                estimate_num_params(*arch, values.get("experts_per_token", 1), gated_mlp=gated)
                if values.get("num_experts", 1) > 1
                else values["num_params"]
            )
        result.add_model(ModelSpec(name=name, **values))
    return result
