"""GPU and model catalogs: names, YAML extension and overrides, HuggingFace configs, errors."""

from __future__ import annotations

import pytest

from scheduler.catalog import (
    CatalogError,
    default_catalog,
    estimate_num_params,
    extend_catalog,
    model_from_hf_config,
)

# The architecture fields of meta-llama/Meta-Llama-3-8B's config.json.
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
# bigscience/bloom's config.json: GPT-style field names, no intermediate_size, no gate.
BLOOM_CONFIG = {
    "model_type": "bloom",
    "n_layer": 70,
    "hidden_size": 14336,
    "n_head": 112,
    "vocab_size": 250880,
    "tie_word_embeddings": True,
}


def test_names_are_case_insensitive() -> None:
    catalog = default_catalog()
    assert catalog.gpu("a100-80gb") is catalog.gpu("A100-80GB")
    assert catalog.model("LLAMA-3-8B").name == "llama-3-8b"
    assert catalog.model("Mixtral-8x7B").num_experts == 8


def test_issue_names_are_all_present() -> None:
    catalog = default_catalog()
    for gpu in ("A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-80GB", "H200"):
        assert catalog.gpu(gpu).usd_per_hour > 0
    for model in ("llama-3-8b", "llama-3-70b", "llama-2-7b", "llama-2-70b", "qwen2.5-0.5b",
                  "qwen2.5-1.5b", "qwen2.5-7b", "mixtral-8x7b", "bloom-176b"):
        assert catalog.model(model).kv_bytes_per_token > 0


def test_unknown_names_list_the_known_ones() -> None:
    catalog = default_catalog()
    with pytest.raises(CatalogError) as gpu_error:
        catalog.gpu("B300")
    assert "B300" in str(gpu_error.value) and "A100-80GB" in str(gpu_error.value)
    with pytest.raises(CatalogError) as model_error:
        catalog.model("gpt-5")
    assert "llama-3-8b" in str(model_error.value) and "qwen2.5-7b" in str(model_error.value)


def test_architecture_facts_match_the_published_sizes() -> None:
    catalog = default_catalog()
    llama = catalog.model("llama-3-8b")
    # 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token.
    assert llama.kv_bytes_per_token == 131072
    assert llama.head_dim == 128
    derived = llama.num_layers * llama.active_linear_params_per_layer + 2 * llama.lm_head_params
    assert derived == pytest.approx(llama.num_params, rel=0.01)
    bloom = catalog.model("bloom-176b")
    assert not bloom.gated_mlp
    # BLOOM ties its embeddings: one vocab x hidden matrix.
    derived_bloom = bloom.num_layers * bloom.active_linear_params_per_layer + bloom.lm_head_params
    assert derived_bloom == pytest.approx(176.2e9, rel=0.01)


def test_yaml_override_changes_only_the_field_given() -> None:
    base = default_catalog()
    extended = extend_catalog(base, {"gpus": [{"name": "h100-80gb", "usd_per_hour": 2.5}],
                                     "models": [{"name": "llama-3-8b", "max_context_tokens": 4096}]})
    h100 = extended.gpu("H100-80GB")
    assert h100.usd_per_hour == 2.5
    assert h100.hbm_gbps == base.gpu("H100-80GB").hbm_gbps
    assert extended.model("llama-3-8b").max_context_tokens == 4096
    assert extended.model("llama-3-8b").num_layers == 32
    # The original catalog is untouched.
    assert base.gpu("H100-80GB").usd_per_hour == 7.52


def test_yaml_adds_new_gpus_and_models() -> None:
    document = {
        "gpus": [{"name": "MI300X", "memory_gib": 192, "bf16_tflops": 1307, "hbm_gbps": 5300,
                  "interconnect": "nvlink", "interconnect_gbps": 896, "usd_per_hour": 6.0}],
        "models": [
            {"name": "tiny-moe", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
             "num_kv_heads": 8, "intermediate_size": 1024, "vocab_size": 1000, "num_experts": 4,
             "experts_per_token": 1},
            {"name": "my-llama", "hf_config": LLAMA3_8B_CONFIG, "max_context_tokens": 2048},
        ],
    }
    catalog = extend_catalog(default_catalog(), document, source="fleet.yaml")
    assert catalog.gpu("mi300x").memory_gib == 192
    moe = catalog.model("TINY-MOE")
    assert moe.num_params > moe.active_params > 0
    mine = catalog.model("my-llama")
    assert mine.max_context_tokens == 2048  # a field next to hf_config overrides it
    assert mine.kv_bytes_per_token == catalog.model("llama-3-8b").kv_bytes_per_token


def test_hf_config_parses_llama_and_bloom_layouts() -> None:
    llama = model_from_hf_config("llama3", LLAMA3_8B_CONFIG)
    assert (llama.num_layers, llama.num_kv_heads, llama.gated_mlp) == (32, 8, True)
    assert llama.num_params == pytest.approx(8.03e9, rel=0.01)
    assert llama.max_context_tokens == 8192
    bloom = model_from_hf_config("bloom", BLOOM_CONFIG)
    assert (bloom.num_layers, bloom.num_attention_heads, bloom.num_kv_heads) == (70, 112, 112)
    assert bloom.intermediate_size == 4 * 14336
    assert not bloom.gated_mlp
    assert bloom.num_params == pytest.approx(176.2e9, rel=0.01)
    mixtral = model_from_hf_config("mixtral", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    })
    assert mixtral.num_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.02)


def test_estimate_num_params_non_gated_is_smaller() -> None:
    args = (32, 4096, 32, 32, 11008, 32000)
    assert estimate_num_params(*args, gated_mlp=False) < estimate_num_params(*args)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"models": [{"name": "x", "num_layers": -1}]}, "cat.yaml: models[0].num_layers: expected a positive number"),
        ({"models": [{"name": "llama-3-8b", "num_layers": 2.5}]}, "models[0].num_layers: expected an integer"),
        ({"gpus": [{"name": "A100-80GB", "usd_per_hour": "cheap"}]}, "gpus[0].usd_per_hour: expected a number"),
        ({"gpus": [{"name": "A100-80GB", "colour": "green"}]}, "gpus[0]: unknown key(s) colour"),
        ({"gpus": [{"name": "new-gpu", "memory_gib": 24}]}, "gpus[0]: new GPU 'new-gpu' is missing"),
        ({"models": [{"name": "m", "hf_config": {"hidden_size": 64}}]}, "models[0].hf_config: missing field(s)"),
        ({"models": [{"name": "m", "hf_config": [1, 2]}]}, "models[0].hf_config: expected the mapping"),
        ({"models": [{"name": "m", "gated_mlp": "yes", "num_layers": 2}]}, "models[0].gated_mlp: expected true or false"),
        ({"models": [{"num_layers": 2}]}, "models[0]: expected a mapping with a string 'name'"),
        ({"pools": []}, "cat.yaml: unknown top-level key(s) pools"),
    ],
)
def test_bad_entries_name_the_key_path(document: dict, expected: str) -> None:
    with pytest.raises(CatalogError) as error:
        extend_catalog(default_catalog(), document, source="cat.yaml")
    assert expected in str(error.value)


def test_todays_models_carry_their_config_json_facts() -> None:
    catalog = default_catalog()
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b"):
        assert catalog.model(name).max_context_tokens == 131072
    # Published sizes (within the ~1% norms and biases the estimate leaves out).
    for name, billions in (("llama-3.1-70b", 70.6), ("qwen2.5-72b", 72.7), ("qwen3-32b", 32.8),
                           ("mixtral-8x22b", 140.6), ("gemma-2-9b", 9.24), ("starcoder2-15b", 16.0)):
        assert catalog.model(name).num_params == pytest.approx(billions * 1e9, rel=0.03), name
    qwen3 = catalog.model("qwen3-32b")
    assert qwen3.head_dim == 128 and qwen3.hidden_size // qwen3.num_attention_heads == 80
    moe = catalog.model("qwen3-30b-a3b")
    assert moe.num_experts == 128 and moe.experts_per_token == 8
    assert moe.active_params == pytest.approx(3.3e9, rel=0.05) and moe.num_params == pytest.approx(30.5e9, rel=0.03)
    deepseek = catalog.model("deepseek-v2-lite")
    # Multi-head latent attention caches 512 + 64 values per token and layer, not 2 x 16 x 192.
    assert deepseek.kv_bytes_per_token == 27 * 576 * 2 and deepseek.shared_intermediate_size == 2 * 1408
    assert catalog.model("llama-3.1-8b").source == "meta-llama/Llama-3.1-8B-Instruct config.json"


def test_hugging_face_ids_and_variants_resolve() -> None:
    catalog = default_catalog()
    for hf_id, name in (("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"),
                        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
                        ("google/gemma-2-27b-it", "gemma-2-27b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
                        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"), ("codellama/CodeLlama-34b-hf", "codellama-34b"),
                        ("mistralai/Mistral-Nemo-Instruct-2407", "mistral-nemo-12b")):
        assert catalog.model(hf_id).name == name
    assert catalog.find_model("someone/unknown-7b") is None


def test_hf_config_reads_moe_shared_experts_and_head_dim() -> None:
    config = {"model_type": "deepseek", "num_hidden_layers": 4, "hidden_size": 1024, "num_attention_heads": 8,
              "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 4096, "moe_intermediate_size": 512,
              "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4, "vocab_size": 1000}
    spec = model_from_hf_config("tiny-moe", config)
    assert (spec.num_experts, spec.experts_per_token, spec.intermediate_size) == (16, 4, 512)
    assert spec.shared_intermediate_size == 1024 and spec.head_dim == 256
    per_layer = 1024 * 256 * (16 + 16) + 3 * 1024 * (512 * 4 + 1024)
    assert spec.num_layers * spec.active_linear_params_per_layer == 4 * per_layer
