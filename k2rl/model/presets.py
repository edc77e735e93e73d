"""K2-architecture model presets: the real 1T config, a one-GPU size and a CPU test size.

Every preset is a plain dict of `DeepseekV3Config` keys, so the same code path builds, saves and loads
all three; only the numbers differ.
"""
from __future__ import annotations

import copy

# Kimi K2 (BRIEF.md table). model_type stays "kimi_k2" in the real checkpoint; transformers and vLLM
# load it as DeepSeek-V3, which is what we write.
K2 = dict(
    vocab_size=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    num_attention_heads=64,
    num_key_value_heads=64,
    n_routed_experts=384,
    num_experts_per_tok=8,
    n_shared_experts=1,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.827,
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    rope_theta=50000.0,
    rope_scaling=dict(
        type="yarn",
        factor=32.0,
        beta_fast=1.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
    ),
    num_nextn_predict_layers=0,
    bos_token_id=163584,
    eos_token_id=163585,
    tie_word_embeddings=False,
    hidden_act="silu",
    initializer_range=0.02,
)

# About 2.6 B total / 0.6 B active: K2's ratios (first layer dense, one shared expert, sparsity 8 of
# 64, sigmoid noaux_tc router, MLA with K2's ranks) at a size that trains in bf16 on one H200.
K2_MINI = dict(
    K2,
    vocab_size=32768,
    hidden_size=2048,
    intermediate_size=5632,
    moe_intermediate_size=512,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    num_experts_per_tok=8,
    q_lora_rank=768,
    max_position_embeddings=16384,
    rope_scaling=None,
    bos_token_id=0,  # [BOS] and [EOS] in k2rl.model.tokenizer.SPECIAL_TOKENS order
    eos_token_id=1,
)

# Inside vLLM-CPU's MLA kernel (kv_lora_rank 512, rope 64 are fixed there); everything else tiny so a
# train step takes well under a second on two cores.
K2_TINY = dict(
    K2_MINI,
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    q_lora_rank=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    max_position_embeddings=4096,
    routed_scaling_factor=1.0,
)

PRESETS: dict[str, dict] = {"k2": K2, "k2-mini": K2_MINI, "k2-tiny": K2_TINY}


def preset_config(name: str) -> dict:
    """A fresh copy of a preset's config dict; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
