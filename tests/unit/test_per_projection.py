"""Per-projection LoRA without Megatron (issue 18): the row map, the block B, PEFT import / export.

The reference for every delta is PEFT's own ``s * B_p @ A_p`` per projection (``peft_deltas``);
the Megatron side multiplies the way a layer does, ``s * lora_b_for_gemm(B) @ A`` with the layer's
row map, so the map of ``core/projections.py`` is checked against the HF mapping's fused rows.
"""

import math
import types

import pytest
import torch

from megatron_lora.core.checkpoint.files import CONFIG_FIELDS_THAT_MUST_MATCH, saved_config_value
from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.projections import block_structured_b, column_index, logical_row_projections
from megatron_lora.hf.peft_adapters import megatron_from_peft, peft_from_megatron, peft_key
from tests.peft_reference import peft_deltas
from tests.unit.test_hf_mapping import ARCH, PROJECTIONS, _config, _megatron_deltas, _peft

# The Megatron config of ARCH: 4 heads in 2 query groups of head dim 16, SwiGLU ffn 128.
MEGATRON = types.SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=16, gated_linear_unit=True)
QKV, FC1 = "self_attention.linear_qkv", "mlp.linear_fc1"


def _rows(module):
    out_features = ARCH.module_shape(module)[0]
    return logical_row_projections(MEGATRON, out_features, qkv=module == QKV, gated=module == FC1)


def test_row_map_follows_the_grouped_qkv_rows_and_gate_up():
    config = types.SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=1)
    assert logical_row_projections(config, 8, qkv=True, gated=False).tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    assert logical_row_projections(config, 6, qkv=False, gated=True).tolist() == [0, 0, 0, 1, 1, 1]
    assert logical_row_projections(config, 6, qkv=False, gated=False) is None
    with pytest.raises(ValueError, match=r"linear_qkv rows of q, k and v only.*has 12.*--lora-per-projection"):
        logical_row_projections(config, 12, qkv=True, gated=False)  # e.g. attention_output_gate rows


def test_block_structured_b_and_its_gradient_is_the_compact_one():
    rows = torch.tensor([0, 0, 1, 2, 0, 0, 1, 2])
    b = torch.randn(8, 3, requires_grad=True)
    dense = block_structured_b(b, column_index(rows, 3), 3)
    assert dense.shape == (8, 9)
    for j, p in enumerate(rows.tolist()):
        assert torch.equal(dense[j, 3 * p:3 * p + 3], b[j]) and dense[j].count_nonzero() == b[j].count_nonzero()
    upstream = torch.randn(8, 9)
    dense.backward(upstream)
    assert torch.equal(b.grad, upstream.gather(1, column_index(rows, 3)))


def _layer_deltas(tensors, cfg):
    """{(layer, projection): s * B_block @ A}, B_block built as a per-projection layer builds it."""
    def block(module, b):
        rows = _rows(module)
        return b if rows is None else block_structured_b(b, column_index(rows, cfg.rank), int(rows.max()) + 1)

    return _megatron_deltas(tensors, cfg, block)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_distinct_a_import_per_projection_at_peft_rank_with_the_same_deltas(use_rslora):
    peft = _peft()
    tensors, cfg = megatron_from_peft(peft, _config(use_rslora=use_rslora), ARCH, per_projection=True)
    assert (cfg.rank, cfg.alpha, cfg.use_rslora, cfg.per_projection) == (4, 8, use_rslora, True)
    assert tensors[f"decoder.layers.0.{QKV}.lora_A"].shape == (12, 64)  # [A_q; A_k; A_v]
    assert tensors[f"decoder.layers.0.{QKV}.lora_B"].shape == (128, 4)  # compact: rank r
    assert tensors[f"decoder.layers.0.{FC1}.lora_A"].shape == (8, 64)
    assert tensors["decoder.layers.0.mlp.linear_fc2.lora_A"].shape == (4, 128)
    got, want = _layer_deltas(tensors, cfg), peft_deltas(peft, 8 / (math.sqrt(4) if use_rslora else 4))
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_per_projection_round_trip_returns_the_original_factors():
    peft = _peft()
    tensors, cfg = megatron_from_peft(peft, _config(), ARCH, per_projection=True)
    for compact in (True, False):
        back, config = peft_from_megatron(tensors, cfg, ARCH, compact=compact)
        assert set(back) == set(peft) and all(torch.equal(back[k], peft[k]) for k in peft)
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, list(PROJECTIONS))


def test_trained_per_projection_adapter_exports_at_rank_r_where_the_stacked_one_does_not():
    """Training fills every entry of the factors: a stacked B then uses all 3r columns on every
    projection; a per-projection adapter has no such columns to fill."""
    g = torch.Generator().manual_seed(3)

    def trained(tensors):
        return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in tensors.items()}

    per_projection, cfg = megatron_from_peft(_peft(), _config(), ARCH, per_projection=True)
    back, config = peft_from_megatron(trained(per_projection), cfg, ARCH)
    assert config["r"] == 4
    shapes = ARCH.part_shapes()
    for layer in (0, 1):
        for part in PROJECTIONS:
            assert back[peft_key(layer, part, "lora_A")].shape == (4, shapes[part][1])
            assert back[peft_key(layer, part, "lora_B")].shape == (shapes[part][0], 4)
    stacked, stacked_cfg = megatron_from_peft(_peft(), _config(), ARCH)
    assert peft_from_megatron(trained(stacked), stacked_cfg, ARCH)[1]["r"] == 12


def test_absent_projections_import_as_exact_zeros():
    peft = _peft(parts=("q_proj", "v_proj", "up_proj"), layers=(1,))
    tensors, cfg = megatron_from_peft(peft, _config(target_modules=["q_proj", "v_proj", "up_proj"]), ARCH,
                                      per_projection=True)
    assert cfg.rank == 4 and cfg.target_modules == ("linear_qkv", "linear_fc1")
    deltas = _layer_deltas(tensors, cfg)
    assert not deltas[(0, "q_proj")].any() and not deltas[(1, "k_proj")].any() and not deltas[(1, "gate_proj")].any()
    torch.testing.assert_close(deltas[(1, "v_proj")], peft_deltas(peft, 2.0)[(1, "v_proj")])


def test_per_projection_is_a_config_field_a_checkpoint_must_match():
    assert "per_projection" in CONFIG_FIELDS_THAT_MUST_MATCH
    older = LoRAConfig(rank=4).to_dict()
    del older["per_projection"]  # a descriptor written before the field existed
    assert saved_config_value(older, "per_projection") is False
    assert LoRAConfig.from_dict(older) == LoRAConfig(rank=4)


def test_per_projection_flag_round_trips():
    import argparse

    from megatron_lora.training.arguments import add_lora_args, lora_config_from_args, lora_flags

    cfg = LoRAConfig(rank=4, alpha=8, per_projection=True)
    flags = lora_flags(cfg)
    assert "--lora-per-projection" in flags
    assert lora_config_from_args(add_lora_args(argparse.ArgumentParser()).parse_args(flags)) == cfg
