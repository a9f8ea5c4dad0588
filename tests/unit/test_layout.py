import pytest
import torch

from megatron_lora.core.layout import AdapterLayout, shard_tensor, unshard_tensors


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("layout", [AdapterLayout.column(), AdapterLayout.column(gated=True), AdapterLayout.row()],
                         ids=["column", "column-gated", "row"])
def test_shard_then_unshard_is_identity(layout, world):
    shapes = layout.logical_shapes(in_features=16, out_features=24, rank=4)
    for factor, shape in shapes.items():
        full = torch.randn(shape)
        shards = [layout.shard(factor, full, r, world) for r in range(world)]
        assert all(s.shape == layout.local_shape(factor, shape, world) for s in shards)
        assert torch.equal(layout.unshard(factor, shards), full)


def test_gated_rows_shard_as_gate_i_then_up_i():
    # rows 0..3 are the gate, rows 4..7 the up projection
    full = torch.arange(8.0).unsqueeze(1)
    assert shard_tensor(full, 0, 0, 2, gated=True).flatten().tolist() == [0, 1, 4, 5]
    assert shard_tensor(full, 0, 1, 2, gated=True).flatten().tolist() == [2, 3, 6, 7]
    # a naive split would hand rank 0 only gate rows: the docs/design.md §10, trap 5 permutation
    assert shard_tensor(full, 0, 0, 2).flatten().tolist() == [0, 1, 2, 3]
    shards = [shard_tensor(full, 0, r, 2, gated=True) for r in range(2)]
    assert torch.equal(unshard_tensors(shards, 0, gated=True), full)


def test_partition_dims_follow_the_base_layer():
    assert (AdapterLayout.column().a_dim, AdapterLayout.column().b_dim) == (None, 0)
    assert (AdapterLayout.row().a_dim, AdapterLayout.row().b_dim) == (1, None)


def test_size_that_does_not_divide_names_factor_sizes_and_tp():
    with pytest.raises(ValueError, match=r"lora_B: logical size 10 on dim 0 .* 4 equal parts \(TP size 4\)"):
        AdapterLayout.column().local_shape("lora_B", (10, 4), 4)
    with pytest.raises(ValueError, match="gated"):
        AdapterLayout.column(gated=True).local_shape("lora_B", (12, 4), 4)
