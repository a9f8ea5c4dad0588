"""Tiny random Qwen3 (qk-norm), Qwen3-MoE and Mixtral models built with transformers, and PEFT
adapters on them whose every factor is random and non-zero, for the PEFT conversion tests."""

import copy

import peft
import torch
import transformers

from megatron_lora.hf.mapping import Arch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "mlp.gate.weight"
R, ALPHA = 2, 6
TOKENS = torch.tensor([[3, 17, 42, 5, 9, 33, 61, 0, 12, 28, 7, 50]])
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager")


def tiny_hf(model_type):
    """fp32, 2 layers; MoE: 4 experts top-2 (Qwen3-MoE with 2I = H, so both fused lora_B have one shape)."""
    torch.manual_seed({"qwen3": 0, "qwen3_moe": 1, "mixtral": 2}[model_type])
    if model_type == "qwen3":  # head_dim 16 != hidden / heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, intermediate_size=48, head_dim=16))
    elif model_type == "qwen3_moe":  # 2 * moe_intermediate_size == hidden_size
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **COMMON, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.2) if "norm" in name else param.normal_(0.0, 0.1)
    return model.eval()


def arch_of(model) -> Arch:
    """The conversion sizes of a ``tiny_hf`` model."""
    c = model.config
    moe = c.model_type != "qwen3"
    return Arch(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
                num_heads=c.num_attention_heads, num_groups=c.num_key_value_heads, head_dim=c.head_dim,
                vocab_size=c.vocab_size, tied=False, qkv_bias=False, qk_norm=c.model_type != "mixtral",
                num_experts=(c.num_local_experts if c.model_type == "mixtral" else c.num_experts) if moe else 0,
                moe_topk=c.num_experts_per_tok if moe else 0,
                moe_ffn_hidden_size=getattr(c, "moe_intermediate_size", c.intermediate_size) if moe else 0)


def random_peft_model(base, target_modules=ATTENTION, target_parameters=(*EXPERTS, ROUTER), seed=5, one_qkv_a=False,
                **kwargs):
    """``base`` (copied) with a PEFT adapter whose every factor is random and non-zero; with
    ``one_qkv_a`` q, k and v share one A per layer (as our exports write), so it imports at rank r:
    a 4-expert router takes rank 4 at most."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(target_modules),
                             target_parameters=list(target_parameters) or None, **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        if one_qkv_a:
            for layer in model.base_model.model.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.lora_A["default"].weight.copy_(layer.self_attn.q_proj.lora_A["default"].weight)
    return model.eval()
