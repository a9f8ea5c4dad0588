"""The ``config.json`` dialect of each Hugging Face family a conversion supports: where it keeps
its sizes, its defaults, what it can hold that Megatron's GPT here cannot, and the config it is
written back as. Plain dicts in and out (no torch, no transformers); ``mapping`` builds on it.

==========  ====================  ===========  ================================================
model_type  class                 q/k norm     MLP
==========  ====================  ===========  ================================================
llama       LlamaForCausalLM      no           SwiGLU, ``intermediate_size``
qwen2       Qwen2ForCausalLM      no           SwiGLU; q/k/v biases
qwen3       Qwen3ForCausalLM      per head     SwiGLU, ``intermediate_size``
qwen3_moe   Qwen3MoeForCausalLM   per head     experts of ``moe_intermediate_size``; softmax,
                                               top-k, renormalised only if ``norm_topk_prob``
mixtral     MixtralForCausalLM    no           experts of ``intermediate_size``; softmax, top-k,
                                               always renormalised
==========  ====================  ===========  ================================================

Every MoE layer's MLP must be routed experts (no dense layers in between, no shared expert).
Defaults are transformers 5.25's, for fields a config.json leaves out.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

FAMILIES: Dict[str, str] = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
}
QK_NORM = ("qwen3", "qwen3_moe")
MOE = ("qwen3_moe", "mixtral")
# Defaults of the transformers config classes: head_dim of Qwen3 is a fixed 128, not hidden / heads.
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, head_dim=128),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=False),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6),
}
# Config fields that give away what no supported family has, for the message about another family.
_FEATURES = (("kv_lora_rank", "multi-latent attention (MLA)"), ("q_lora_rank", "multi-latent attention (MLA)"),
             ("n_shared_experts", "shared experts"), ("shared_expert_intermediate_size", "shared experts"),
             ("moe_shared_expert_intermediate_size", "shared experts"))


def supported() -> str:
    return ", ".join(f"{t} ({a})" for t, a in FAMILIES.items())


def default(cfg: dict, key: str):
    """``cfg[key]``, or the family's default where the config leaves it out (None: no default)."""
    value = cfg.get(key)
    return _DEFAULTS.get(cfg.get("model_type"), {}).get(key) if value is None else value


def rope(cfg: dict) -> Tuple[float, str]:
    """(rope theta, rope type) from a transformers 4.x (rope_theta / rope_scaling) or 5.x
    (rope_parameters) config."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", default(cfg, "rope_theta"))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, kind


def num_experts(cfg: dict):
    """Qwen3-MoE configs spell it ``num_experts`` (what Qwen publishes) or ``num_local_experts``
    (what transformers 5 writes: its attribute_map aliases the two); Mixtral the latter."""
    return cfg.get("num_experts", cfg.get("num_local_experts"))


def unsupported_family(cfg: dict) -> str:
    """Why a config of another model_type does not convert: the type and the features it gives away."""
    features = sorted({what for key, what in _FEATURES if cfg.get(key)})
    if cfg.get("hidden_act", "silu") not in ("silu", None):
        features.append(f"hidden_act {cfg['hidden_act']!r} (not SwiGLU)")
    why = f" ({'; '.join(features)})" if features else ""
    return f"model_type {cfg.get('model_type')!r} is not supported{why}"


def missing_sizes(cfg: dict) -> List[str]:
    """The integer size fields this family needs that the config lacks."""
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    if cfg["model_type"] in MOE:
        keys.append("num_experts_per_tok")
    if cfg["model_type"] == "qwen3_moe":
        keys.append("moe_intermediate_size")
    missing = [k for k in keys if not isinstance(cfg.get(k), int)]
    if cfg["model_type"] in MOE and not isinstance(num_experts(cfg), int):
        missing.append("num_experts / num_local_experts")
    return missing


def config_problems(cfg: dict) -> List[str]:
    """What this config holds that Megatron's GPT of ``pretrain_gpt_lora.py`` cannot reproduce
    exactly (empty: it converts). The family is a supported one, with its sizes."""
    model_type, problems = cfg["model_type"], []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (only SwiGLU, 'silu', maps to --swiglu)")
    theta, kind = rope(cfg)
    if kind != "default":
        problems.append(f"rope scaling {kind!r} (pretrain_gpt_lora.py has plain RoPE only)")
    if float(theta) != int(theta):
        problems.append(f"rope_theta {theta} (--rotary-base takes an integer)")
    if model_type in ("llama", *QK_NORM) and cfg.get("attention_bias"):
        problems.append("attention_bias=true (bias on q/k/v AND o_proj; --add-qkv-bias covers q/k/v only)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (the MLP has no bias here)")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true (attention here is full causal)")
    if model_type == "mixtral" and cfg.get("sliding_window") is not None:
        problems.append(f"sliding_window {cfg['sliding_window']} (attention here is full causal)")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        problems.append("layer_types with sliding-window attention (attention here is full causal)")
    heads, groups = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % groups:
        problems.append(f"num_attention_heads {heads} not a multiple of num_key_value_heads {groups}")
    if model_type == "qwen3_moe":
        if cfg.get("mlp_only_layers"):
            problems.append(f"mlp_only_layers {cfg['mlp_only_layers']} (dense layers between MoE layers; "
                            "every layer here is MoE)")
        if cfg.get("decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step {cfg['decoder_sparse_step']} (dense layers between MoE layers; "
                            "every layer here is MoE)")
    if model_type == "mixtral" and cfg.get("router_jitter_noise"):
        problems.append(f"router_jitter_noise {cfg['router_jitter_noise']} (training noise on the MoE input; "
                        "Megatron's router has no equivalent; set it to 0)")
    if model_type in MOE and not 1 <= cfg["num_experts_per_tok"] <= num_experts(cfg):
        problems.append(f"num_experts_per_tok {cfg['num_experts_per_tok']} not between 1 and "
                        f"{num_experts(cfg)} experts")
    return problems


def arch_fields(cfg: dict) -> dict:
    """The ``mapping.Arch`` fields of a supported, checked config."""
    model_type, heads = cfg["model_type"], cfg["num_attention_heads"]
    fields = dict(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                  ffn_hidden_size=cfg["intermediate_size"], num_heads=heads,
                  num_groups=cfg.get("num_key_value_heads") or heads,
                  head_dim=default(cfg, "head_dim") or cfg["hidden_size"] // heads,
                  vocab_size=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                  qkv_bias=model_type == "qwen2", qk_norm=model_type in QK_NORM)
    if model_type in MOE:
        fields.update(num_experts=num_experts(cfg), moe_topk=cfg["num_experts_per_tok"],
                      moe_ffn_hidden_size=cfg["moe_intermediate_size" if model_type == "qwen3_moe"
                                              else "intermediate_size"],
                      moe_pre_softmax=model_type == "qwen3_moe" and not default(cfg, "norm_topk_prob"))
    return fields


def config_json(arch, norm_epsilon: float, rotary_base: int, max_position_embeddings: int, dtype: str) -> dict:
    """A config.json that transformers loads as ``arch`` (a ``mapping.Arch``) in its family."""
    model_type = arch.model_type
    cfg = dict(architectures=[FAMILIES[model_type]], model_type=model_type,
               hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
               num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
               num_key_value_heads=arch.num_groups, head_dim=arch.head_dim, hidden_act="silu",
               rms_norm_eps=norm_epsilon, rope_theta=float(rotary_base),
               max_position_embeddings=max_position_embeddings,
               vocab_size=arch.vocab_size, tie_word_embeddings=arch.tied, attention_dropout=0.0,
               torch_dtype=dtype)
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mixtral":
        cfg.update(sliding_window=None, router_jitter_noise=0.0)
    else:
        cfg.update(use_sliding_window=False)
    if model_type in QK_NORM:
        cfg.update(attention_bias=False)
    if model_type == "qwen3_moe":
        cfg.update(num_experts=arch.num_experts, num_experts_per_tok=arch.moe_topk,
                   moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=not arch.moe_pre_softmax,
                   decoder_sparse_step=1, mlp_only_layers=[])
    elif model_type == "mixtral":
        cfg.update(num_local_experts=arch.num_experts, num_experts_per_tok=arch.moe_topk,
                   intermediate_size=arch.moe_ffn_hidden_size)
    return cfg
