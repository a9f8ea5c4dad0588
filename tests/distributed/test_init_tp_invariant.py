"""TP-aware init (docs/design.md §5): the logical A depends on (seed, name), never on TP size or rank."""

import contextlib
import math

import pytest
import torch

from megatron_lora import LoRAConfig
from megatron_lora.core.layers import LORA_FACTORS
from tests.distributed import breakages
from tests.distributed.launcher import run_distributed

IN, OUT, RANK = 32, 48, 4
NAMES = ("decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.self_attention.linear_qkv")


def init_worker(breakage=contextlib.nullcontext):
    """Build column, gated-column and row LoRA layers under two names (under ``breakage``);
    return local factors."""
    from megatron.core import ModelParallelConfig, parallel_state

    from megatron_lora import LoRAColumnParallelLinear, LoRARowParallelLinear
    from megatron_lora.core import init as lora_init

    draws = []  # ranks that materialise a full logical A
    original = lora_init.logical_lora_a
    lora_init.logical_lora_a = lambda *a, **k: draws.append(1) or original(*a, **k)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    mp_cfg_gated = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    mp_cfg_gated.gated_linear_unit = True
    lora = LoRAConfig(rank=RANK, alpha=8, seed=3)
    out = {}
    for name in NAMES:
        kw = dict(init_method=torch.nn.init.normal_, lora_config=lora, lora_init_name=name)
        with breakage():
            col = LoRAColumnParallelLinear(IN, OUT, config=cfg, bias=False, **kw)
            gated = LoRAColumnParallelLinear(IN, OUT, config=mp_cfg_gated, bias=False,
                                             tp_comm_buffer_name="fc1", **kw)
            row = LoRARowParallelLinear(IN, OUT, config=cfg, bias=False, input_is_parallel=True,
                                        skip_bias_add=False, **kw)
        for kind, layer in (("column", col), ("gated", gated), ("row", row)):
            out[(kind, name)] = dict(A=layer.lora_A.detach().clone(), B=layer.lora_B.detach().clone(),
                                     layout=layer.lora_layout,
                                     attrs={f: (getattr(getattr(layer, f), "tensor_model_parallel", None),
                                                getattr(getattr(layer, f), "partition_dim", None))
                                            for f in LORA_FACTORS})
    return dict(factors=out, draws=len(draws), tp_rank=parallel_state.get_tensor_model_parallel_rank())


_cache = {}


def logical(tp, breakage=contextlib.nullcontext):
    key = (tp, breakage)
    if key not in _cache:
        ranks = run_distributed(init_worker, tp, breakage, tp=tp)
        _cache[key] = ranks, {k: ranks[0]["factors"][k]["layout"].unshard(
            "lora_A", [r["factors"][k]["A"] for r in ranks]) for k in ranks[0]["factors"]}
    return _cache[key]


@pytest.mark.parametrize("tp", [2, 4])
def test_gathered_logical_a_is_identical_to_tp1(tp):
    _, ref = logical(1)
    _, got = logical(tp)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_kaiming_bound_uses_logical_fan_in_and_b_starts_at_zero():
    ranks, ref = logical(4)
    for key, a in ref.items():
        assert a.shape == (RANK, IN)
        assert a.abs().max() <= 1 / math.sqrt(IN) and a.abs().max() > 0.8 / math.sqrt(IN), key
    assert all(torch.count_nonzero(f["B"]) == 0 for r in ranks for f in r["factors"].values())


def test_different_layers_get_different_a():
    _, ref = logical(2)
    for kind in ("column", "row"):
        assert not torch.equal(ref[(kind, NAMES[0])], ref[(kind, NAMES[1])])


def test_only_the_tp_source_rank_materialises_the_full_a():
    ranks, _ = logical(4)
    assert [r["draws"] for r in ranks] == [len(ranks[0]["factors"]), 0, 0, 0]


def test_only_sharded_factors_carry_tensor_parallel_attributes():
    ranks, _ = logical(2)
    attrs = {kind: ranks[0]["factors"][(kind, NAMES[0])]["attrs"] for kind in ("column", "row")}
    assert attrs["column"] == {"lora_A": (None, None), "lora_B": (True, 0)}
    assert attrs["row"] == {"lora_A": (True, 1), "lora_B": (None, None)}


def test_harness_bites_per_shard_init_with_shard_fan_in():
    """Breaking the init (each rank draws its own shard, shard fan-in) must be detected."""
    _, ref = logical(1)
    _, broken = logical(2, breakages.shard_fan_in_init)
    assert not torch.equal(broken[("row", NAMES[0])], ref[("row", NAMES[0])])
    assert broken[("row", NAMES[0])].abs().max() > 1 / math.sqrt(IN)  # bound of in/t, the docs/design.md §10, trap 1 bug
