import math

import torch

from megatron_lora.core.init import logical_lora_a, name_seed


def test_kaiming_bound_uses_the_logical_fan_in():
    a = logical_lora_a((8, 4096), "kaiming", seed=1, name="decoder.layers.3.mlp.linear_fc2")
    bound = 1 / math.sqrt(4096)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # uniform fills the interval, so the bound is the fan-in's
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_gaussian_std_is_one_over_rank():
    a = logical_lora_a((16, 4096), "gaussian", seed=1, name="x")
    assert abs(a.std().item() - 1 / 16) < 0.002


def test_a_depends_on_seed_and_name_only():
    shape = (4, 32)
    same = logical_lora_a(shape, "kaiming", 5, "decoder.layers.1.self_attention.linear_qkv")
    assert torch.equal(same, logical_lora_a(shape, "kaiming", 5, "decoder.layers.1.self_attention.linear_qkv"))
    assert not torch.equal(same, logical_lora_a(shape, "kaiming", 5, "decoder.layers.2.self_attention.linear_qkv"))
    assert not torch.equal(same, logical_lora_a(shape, "kaiming", 6, "decoder.layers.1.self_attention.linear_qkv"))


def test_name_seed_is_stable_across_processes():
    # sha256-based: a fixed value, unlike Python's salted hash()
    assert name_seed(1234, "decoder.layers.0.mlp.linear_fc1") == name_seed(1234, "decoder.layers.0.mlp.linear_fc1")
    assert 0 <= name_seed(0, "") < 2 ** 63
