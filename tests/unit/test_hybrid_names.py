"""HybridModel names and patterns (megatron_lora.core.hybrid): pure functions, every release."""

import pytest

from megatron_lora.core.hybrid import check_pattern, gpt_key_of_hybrid, hybrid_key_of_gpt

PAIRS = {
    "decoder.layers.0.self_attention.linear_qkv.lora_A": "decoder.layers.0.self_attention.linear_qkv.lora_A",
    "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.1.mlp.linear_fc1.lora_B": "decoder.layers.0.mlp.linear_fc1.lora_B",
    "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.6.self_attention.linear_proj.weight": "decoder.layers.3.self_attention.linear_proj.weight",
    "decoder.layers.7.mlp.linear_fc2.lora_A": "decoder.layers.3.mlp.linear_fc2.lora_A",
    "decoder.final_norm.weight": "decoder.final_layernorm.weight",
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "output_layer.weight": "output_layer.weight",
}


@pytest.mark.parametrize("hybrid,gpt", PAIRS.items())
def test_hybrid_layers_2i_and_2i_plus_1_are_gpt_layer_i(hybrid, gpt):
    assert gpt_key_of_hybrid(hybrid) == gpt
    assert hybrid_key_of_gpt(gpt) == hybrid


def test_a_name_off_the_pattern_is_refused():
    with pytest.raises(ValueError, match="attention at even indices"):
        gpt_key_of_hybrid("decoder.layers.1.self_attention.linear_qkv.lora_A")


def test_layer_kinds_that_need_cuda_kernels_are_refused_by_name():
    check_pattern("*-|*-")
    with pytest.raises(ValueError, match=r"found \['M'\].*mamba-ssm"):
        check_pattern("M*-")
    with pytest.raises(ValueError, match="multi-token prediction"):
        check_pattern("*-/*-")
