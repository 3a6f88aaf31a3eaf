"""Tiny random models of every family in the test matrix, made locally with transformers (no hub).

Each config is the family's transformers defaults with tiny sizes (hidden 64, 2-4 layers, vocabulary 256 to fit the
locally trained tokenizer) and the few keys a family needs to build at that size.
"""

from __future__ import annotations

from pathlib import Path

import torch

DENSE_MATRIX = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "phi", "phi3", "falcon", "mpt",
    "gpt2", "gpt_neox", "gpt_bigcode", "starcoder2", "stablelm", "granite", "cohere", "glm4", "exaone4",
)  # fmt: skip

COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}
# Keys a family names differently or needs at this size.
EXTRA: dict[str, dict] = {
    "falcon": {"head_dim": None, "ffn_hidden_size": 128, "new_decoder_architecture": True, "num_kv_heads": 2},
    "mpt": {"d_model": 64, "n_heads": 4, "n_layers": 3, "expansion_ratio": 2, "max_seq_len": 128},
    "gpt2": {"n_inner": 128},
    "gpt_bigcode": {"n_inner": 128, "multi_query": True},
    "phi": {"partial_rotary_factor": 0.5},
    "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16},
    "cohere": {"logit_scale": 0.5},
    "exaone4": {"sliding_window": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "n_group": 1, "topk_group": 1},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "n_group": 1, "topk_group": 1},
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                 "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 0,
                     "moe_layer_start_index": 1, "moe_layer_end_index": 2},
    "ernie4_5": {"use_bias": False},
}  # fmt: skip

MOE_MATRIX = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "gpt_oss", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "ernie4_5_moe",
)  # fmt: skip


def tiny_config(model_type: str, **overrides):
    """The transformers config of a tiny `model_type` model, as transformers writes it."""
    from transformers import AutoConfig

    kwargs = {**COMMON, **EXTRA.get(model_type, {}), **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: a key the family computes itself
    return AutoConfig.for_model(model_type, **kwargs)


def make_family_model(out: Path, model_type: str, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """A random tiny `model_type` model saved with save_pretrained (safetensors, float32)."""
    from transformers import AutoModelForCausalLM

    from moekit.demo.tiny_models import make_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        # Default init (std 0.02, norms 1) gives near-identical logits; spread weights so merges differ visibly.
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.uniform_(0.8, 1.2)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out))
    if tokenizer:
        make_tokenizer(out, vocab_size=256)
    return out
