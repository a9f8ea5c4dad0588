import functools

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_lora import LoRAColumnParallelLinear, LoRAConfig, LoRARowParallelLinear, get_gpt_lora_layer_spec, lora_layer_spec


def _submodules(spec):
    """A spec's submodules: ModuleSpec.submodules, or the keyword of a functools.partial spec
    (megatron-core 0.19 builds the MLP as ``partial(MLP.as_mlp_submodule, submodules=...)``)."""
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


def _linears(spec):
    attn, mlp = _submodules(spec.submodules.self_attention), _submodules(spec.submodules.mlp)
    return dict(linear_qkv=attn.linear_qkv, linear_proj=attn.linear_proj,
                linear_fc1=mlp.linear_fc1, linear_fc2=mlp.linear_fc2)


def test_gpt_lora_spec_swaps_the_four_targets_and_carries_the_config():
    cfg = LoRAConfig(rank=4)
    linears = _linears(get_gpt_lora_layer_spec(cfg, normalization="RMSNorm"))
    expected = dict(linear_qkv=LoRAColumnParallelLinear, linear_proj=LoRARowParallelLinear,
                    linear_fc1=LoRAColumnParallelLinear, linear_fc2=LoRARowParallelLinear)
    for name, spec in linears.items():
        assert spec.module is expected[name], name
        assert spec.params["lora_config"] is cfg


def test_spec_rewrite_only_touches_targets_and_leaves_the_input_spec_alone():
    base = get_gpt_layer_local_spec()
    rewritten = lora_layer_spec(base, LoRAConfig(target_modules=("linear_proj",)))
    assert _linears(rewritten)["linear_proj"].module is LoRARowParallelLinear
    assert _linears(rewritten)["linear_qkv"] is ColumnParallelLinear
    assert _linears(base)["linear_proj"] is RowParallelLinear  # the caller's spec is not mutated


def test_spec_without_any_target_fails_with_the_reason():
    with pytest.raises(ValueError, match="none of \\['q_proj'\\]"):
        lora_layer_spec(get_gpt_layer_local_spec(), LoRAConfig(target_modules=("q_proj",)))


def _moe_linears(spec):
    """(routed experts' fc1/fc2, shared experts' fc1/fc2) of a MoE layer spec."""
    moe = _submodules(spec.submodules.mlp)
    experts, shared = _submodules(moe.experts), _submodules(moe.shared_experts)
    return (experts.linear_fc1, experts.linear_fc2), (shared.linear_fc1, shared.linear_fc2)


def test_scoped_targets_pick_routed_or_shared_experts_in_a_moe_spec():
    base = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    if _submodules(_submodules(base.submodules.mlp).shared_experts) is None:
        pytest.skip("this megatron-core's MoE spec has no shared-expert submodules")
    routed, shared = _moe_linears(lora_layer_spec(base, LoRAConfig(target_modules=("experts.linear_fc1",))))
    assert _module(routed[0]) is LoRAColumnParallelLinear and _module(routed[1]) is RowParallelLinear
    assert _module(shared[0]) is ColumnParallelLinear
    routed, shared = _moe_linears(lora_layer_spec(base, LoRAConfig(target_modules=("shared_experts.linear_fc2",))))
    assert _module(shared[1]) is LoRARowParallelLinear and _module(routed[1]) is RowParallelLinear
    routed, shared = _moe_linears(lora_layer_spec(base, LoRAConfig(target_modules=("linear_fc1",))))
    assert _module(routed[0]) is LoRAColumnParallelLinear and _module(shared[0]) is LoRAColumnParallelLinear


def _module(spec_or_class):
    return getattr(spec_or_class, "module", spec_or_class)


def test_router_target_swaps_the_router_where_the_spec_names_it():
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_lora.core.router import LoRATopKRouter

    moe = _submodules(lora_layer_spec(get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False),
                                      LoRAConfig(target_modules=("linear_qkv", "router")))
                      .submodules.mlp)
    if getattr(moe, "router", None) is None:
        pytest.skip("this megatron-core's MoE spec builds its router inside MoELayer (apply_lora swaps it)")
    assert _module(moe.router) is LoRATopKRouter and moe.router.params["lora_config"].target_modules[1] == "router"
    assert TopKRouter in LoRATopKRouter.__mro__


def test_qk_layernorm_spec_has_sp_capable_torch_norms_on_queries_and_keys():
    """Megatron's local spec puts WrappedTorchNorm there, which refuses sequence parallelism."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_lora.core.norms import LayerNorm, RMSNorm
    from megatron_lora.training.gpt import gpt_layer_spec

    for normalization, norm in (("RMSNorm", RMSNorm), ("LayerNorm", LayerNorm)):
        attention = _submodules(gpt_layer_spec(normalization, qk_layernorm=True).submodules.self_attention)
        assert attention.q_layernorm is norm and attention.k_layernorm is norm
    attention = _submodules(gpt_layer_spec("RMSNorm").submodules.self_attention)
    assert attention.q_layernorm is IdentityOp and attention.k_layernorm is IdentityOp
