"""Tiny random-weight configurations of the transformers MoE families that lexi-pl supports.

They build real transformers classes (no stand-ins) small enough for unit tests on a CPU: hidden size 32,
two decoder layers, eight experts. `save_pretrained` / `from_pretrained` round trips work on them, which is how
the tests exercise the real loading code without a model hub.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
)

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Family-specific fields on top of _COMMON. Every family gets 8 routed experts; native k is 2 unless the
# family's routing needs something else to be interesting.
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=2,
        topk_group=1,
    ),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, layer_types=None),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "jamba": dict(
        num_experts=8,
        num_experts_per_tok=2,
        use_mamba_kernels=False,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=1,
    ),
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2),
    ),
    "glm4_moe": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=2,
        topk_group=1,
        head_dim=8,
    ),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0),
    "minimax": dict(
        num_local_experts=8, num_experts_per_tok=2, head_dim=8, layer_types=["linear_attention", "full_attention"]
    ),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, moe_intermediate_size=32, head_dim=8),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, pad_token_id=1),
    "lfm2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_dense_layers=0,
        layer_types=["conv", "full_attention"],
    ),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=8),
    "jetmoe": dict(num_local_experts=8, num_experts_per_tok=2, kv_channels=8, num_key_value_heads=2),
    "qwen3_vl_moe_text": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
    # Families whose k is fixed in the routing code; the adapter rejects them.
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "switch_transformers": dict(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=8,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
    ),
    "nllb-moe": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_experts=8,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    ),
}

# Families whose k cannot be changed at run time.
FIXED_K_FAMILIES: tuple[str, ...] = ("phimoe", "switch_transformers", "nllb-moe")

# Families without an AutoModelForCausalLM mapping for their (text) config.
_BASE_MODEL_ONLY = {"qwen3_vl_moe_text"}
# Encoder-decoder families, built with their seq2seq auto class.
_SEQ2SEQ = {"switch_transformers", "nllb-moe"}

TINY_FAMILIES: tuple[str, ...] = tuple(name for name in _FAMILY_FIELDS if name not in FIXED_K_FAMILIES)


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Build the tiny config of `model_type`; keyword arguments override its fields."""
    if model_type not in _FAMILY_FIELDS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(_FAMILY_FIELDS)}")
    fields = {**_COMMON, **_FAMILY_FIELDS[model_type], **overrides}
    if model_type in ("dbrx", "switch_transformers", "nllb-moe"):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            fields.pop(name, None)
    return AutoConfig.for_model(model_type, **fields)


def build_tiny(model_type: str, seed: int = 0, std: float = 0.2, **overrides: Any) -> PreTrainedModel:
    """Build a tiny random-weight model of `model_type` in eval mode with eager experts.

    Every parameter is redrawn from N(0, std^2) with `seed`, so routers make confident, varied choices
    (transformers' own init leaves some routers at zero, which would make every expert tie).
    """
    config = tiny_config(model_type, **overrides)
    if model_type in _SEQ2SEQ:
        auto_class = AutoModelForSeq2SeqLM
    elif model_type in _BASE_MODEL_ONLY:
        auto_class = AutoModel
    else:
        auto_class = AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto_class.from_config(config, experts_implementation="eager")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()
