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
