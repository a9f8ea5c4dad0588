"""The per-tensor Hugging Face mapping the in-memory export streams with (``hf/mapping.py``)."""

import pytest
import torch

from megatron_lora.hf.mapping import (
    Arch, ConversionError, hf_from_megatron, hf_from_megatron_tensor, hf_names_of, hf_shapes, megatron_names,
)

ARCH = Arch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_groups=2, head_dim=16,
            vocab_size=384, tied=False, qkv_bias=True)


def test_megatron_names_cover_every_hf_tensor_in_pipeline_order():
    names = megatron_names(ARCH)
    assert names[0] == "embedding.word_embeddings.weight"
    assert names[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert [n for n in names if n.startswith("decoder.layers.")][:1] == ["decoder.layers.0.input_layernorm.weight"]
    hf = [h for n in names for h in hf_names_of(n)]
    assert len(hf) == len(set(hf)) and set(hf) == set(hf_shapes(ARCH))
    tied = Arch(**{**ARCH.__dict__, "tied": True})
    assert "output_layer.weight" not in megatron_names(tied)


def test_one_tensor_maps_like_the_whole_state_dict():
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in megatron_names(ARCH):
        parts = [hf_shapes(ARCH)[h] for h in hf_names_of(name)]
        state[name] = torch.randn(sum(p[0] for p in parts), *parts[0][1:], generator=g)
    whole = hf_from_megatron(state, ARCH)
    for name in megatron_names(ARCH):
        for hf_name, tensor in hf_from_megatron_tensor(name, state[name], ARCH):
            assert torch.equal(tensor, whole[hf_name]) and tuple(tensor.shape) == hf_shapes(ARCH)[hf_name]


def test_a_name_without_hf_counterpart_is_refused():
    with pytest.raises(ConversionError, match="decoder.layers.0.self_attention.linear_qkv.lora_A has no Hugging Face"):
        hf_names_of("decoder.layers.0.self_attention.linear_qkv.lora_A")
