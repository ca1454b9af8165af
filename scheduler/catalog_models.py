"""The models people serve today, as the architecture fields of their HuggingFace config.json.

Each entry is (catalog name, HuggingFace repository, the config.json fields the engine model
needs); `scheduler.catalog.default_catalog` turns them into `ModelSpec`s with
`model_from_hf_config`, so a catalog entry and a user's own `--hf-config` go through the same
code. Instruct / chat variants share the base model's architecture and resolve to the same
entry (`Catalog.find_model` normalises ids). Context lengths are the config's
`max_position_embeddings` (Llama 3.1/3.3: 128k; Qwen2.5 ships 32k and reaches 128k only with
YaRN, which vLLM needs told; Qwen3 dense: 40,960).

DeepSeek-V2-Lite's multi-head latent attention is represented by its compressed KV width
(`kv_lora_rank + qk_rope_head_dim` per layer); its query / output projections are
approximated by the GQA formula with `qk_nope_head_dim + qk_rope_head_dim`-wide heads, and its
first dense layer by a MoE one: within a few percent of its 15.7B weights.
"""

from __future__ import annotations

from typing import Any

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "torch_dtype": "bfloat16"}
_QWEN25 = {"model_type": "qwen2", "torch_dtype": "bfloat16", "max_position_embeddings": 32768}
_QWEN3 = {"model_type": "qwen3", "torch_dtype": "bfloat16", "head_dim": 128, "vocab_size": 151936,
          "max_position_embeddings": 40960}
_CODELLAMA = {"model_type": "llama", "max_position_embeddings": 16384, "vocab_size": 32016}
_STARCODER2 = {"model_type": "starcoder2", "vocab_size": 49152, "max_position_embeddings": 16384,
               "tie_word_embeddings": True}

HF_CONFIGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # Llama 3.1 / 3.2 / 3.3 (128k context).
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", {
        **_LLAMA3, "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "intermediate_size": 14336, "max_position_embeddings": 131072}),
    ("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", {
        **_LLAMA3, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "intermediate_size": 28672, "max_position_embeddings": 131072}),
    ("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", {
        **_LLAMA3, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "intermediate_size": 28672, "max_position_embeddings": 131072}),
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", {
        **_LLAMA3, "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", {
        **_LLAMA3, "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 24,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    # Qwen2.5 dense.
    ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", {
        **_QWEN25, "num_hidden_layers": 36, "hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936, "tie_word_embeddings": True}),
    ("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", {
        **_QWEN25, "num_hidden_layers": 48, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 8, "intermediate_size": 13824, "vocab_size": 152064}),
    ("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", {
        **_QWEN25, "num_hidden_layers": 64, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 8, "intermediate_size": 27648, "vocab_size": 152064}),
    ("qwen2.5-72b", "Qwen/Qwen2.5-72B-Instruct", {
        **_QWEN25, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064}),
    # Qwen3 dense (explicit head_dim 128) and MoE.
    ("qwen3-4b", "Qwen/Qwen3-4B", {
        **_QWEN3, "num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 9728, "tie_word_embeddings": True}),
    ("qwen3-8b", "Qwen/Qwen3-8B", {
        **_QWEN3, "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 12288}),
    ("qwen3-14b", "Qwen/Qwen3-14B", {
        **_QWEN3, "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 8, "intermediate_size": 17408}),
    ("qwen3-32b", "Qwen/Qwen3-32B", {
        **_QWEN3, "num_hidden_layers": 64, "hidden_size": 5120, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 25600}),
    ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", {
        **_QWEN3, "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
        "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8}),
    ("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", {
        **_QWEN3, "model_type": "qwen3_moe", "num_hidden_layers": 94, "hidden_size": 4096,
        "num_attention_heads": 64, "num_key_value_heads": 4, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8}),
    # Mistral / Mixtral.
    ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", {
        "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
        "max_position_embeddings": 32768}),
    # config.json says 1,024,000 positions; 128k is the trained context.
    ("mistral-nemo-12b", "mistralai/Mistral-Nemo-Instruct-2407", {
        "model_type": "mistral", "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 131072,
        "max_position_embeddings": 131072}),
    ("mistral-small-24b", "mistralai/Mistral-Small-24B-Instruct-2501", {
        "model_type": "mistral", "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 32768, "vocab_size": 131072,
        "max_position_embeddings": 32768}),
    ("mistral-large-123b", "mistralai/Mistral-Large-Instruct-2407", {
        "model_type": "mistral", "num_hidden_layers": 88, "hidden_size": 12288, "num_attention_heads": 96,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32768,
        "max_position_embeddings": 131072}),
    ("mixtral-8x22b", "mistralai/Mixtral-8x22B-Instruct-v0.1", {
        "model_type": "mixtral", "num_hidden_layers": 56, "hidden_size": 6144, "num_attention_heads": 48,
        "num_key_value_heads": 8, "intermediate_size": 16384, "vocab_size": 32768,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536}),
    # DeepSeek-style MoE: fine-grained routed experts plus always-on shared experts.
    ("deepseek-moe-16b", "deepseek-ai/deepseek-moe-16b-chat", {
        "model_type": "deepseek", "num_hidden_layers": 28, "hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "vocab_size": 102400,
        "max_position_embeddings": 4096}),
    ("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite-Chat", {
        "model_type": "deepseek_v2", "num_hidden_layers": 27, "hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 192, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "vocab_size": 102400,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "max_position_embeddings": 163840}),
    # Gemma 2 (explicit head_dim; tied embeddings).
    ("gemma-2-2b", "google/gemma-2-2b-it", {
        "model_type": "gemma2", "num_hidden_layers": 26, "hidden_size": 2304, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}),
    ("gemma-2-9b", "google/gemma-2-9b-it", {
        "model_type": "gemma2", "num_hidden_layers": 42, "hidden_size": 3584, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}),
    ("gemma-2-27b", "google/gemma-2-27b-it", {
        "model_type": "gemma2", "num_hidden_layers": 46, "hidden_size": 4608, "num_attention_heads": 32,
        "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 36864, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}),
    # Phi-3.
    ("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", {
        "model_type": "phi3", "num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064,
        "max_position_embeddings": 4096}),
    ("phi-3-small", "microsoft/Phi-3-small-8k-instruct", {
        "model_type": "phi3small", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 100352,
        "max_position_embeddings": 8192}),
    ("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", {
        "model_type": "phi3", "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 10, "intermediate_size": 17920, "vocab_size": 32064,
        "max_position_embeddings": 4096}),
    # Code models measured in shared/data/perf/mlenergy_code.
    ("codellama-7b", "codellama/CodeLlama-7b-hf", {
        **_CODELLAMA, "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 11008}),
    ("codellama-13b", "codellama/CodeLlama-13b-hf", {
        **_CODELLAMA, "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
        "num_key_value_heads": 40, "intermediate_size": 13824}),
    ("codellama-70b", "codellama/CodeLlama-70b-hf", {
        **_CODELLAMA, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672}),
    ("starcoder2-3b", "bigcode/starcoder2-3b", {
        **_STARCODER2, "num_hidden_layers": 30, "hidden_size": 3072, "num_attention_heads": 24,
        "num_key_value_heads": 2, "intermediate_size": 12288}),
    ("starcoder2-7b", "bigcode/starcoder2-7b", {
        **_STARCODER2, "num_hidden_layers": 32, "hidden_size": 4608, "num_attention_heads": 36,
        "num_key_value_heads": 4, "intermediate_size": 18432}),
    ("starcoder2-15b", "bigcode/starcoder2-15b", {
        **_STARCODER2, "num_hidden_layers": 40, "hidden_size": 6144, "num_attention_heads": 48,
        "num_key_value_heads": 4, "intermediate_size": 24576}),
    ("codegemma-2b", "google/codegemma-1.1-2b", {
        "model_type": "gemma", "num_hidden_layers": 18, "hidden_size": 2048, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 16384, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}),
    ("codegemma-7b", "google/codegemma-7b", {
        "model_type": "gemma", "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 256, "intermediate_size": 24576, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192}),
)
