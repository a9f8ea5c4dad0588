"""Where the LoRA factors' gradients are summed: the flags Megatron's DDP and
``finalize_model_grads`` read (docs/design.md §1, §3).

Megatron's ``finalize_model_grads`` all-reduces over TP every parameter marked
``sequence_parallel`` when the config has SP. A replicated LoRA factor must be marked exactly when
its gradient is a per-sequence-chunk partial sum, i.e. when the layer's one collective is a
reduce-scatter, or when the layer is an expert whose token dispatcher reduces over an expert-TP
group equal to the TP group ("partial"). A layer whose caller reduces without such a per-step sum
(``disable_grad_reduce``) gives its rider its own all-reduce, so its gradient is already complete
and summing it again would multiply it by the TP size.
"""

import pytest

from tests.distributed.launcher import run_distributed


def marking_worker(cases):
    from megatron_lora import LoRAConfig
    from tests.distributed.layer_cases import build_layer

    out = {}
    for case in cases:
        layer = build_layer(case, 2, LoRAConfig(rank=4, alpha=8))
        replicated = layer.lora_A if case.kind == "column" else layer.lora_B
        sharded = layer.lora_B if case.kind == "column" else layer.lora_A
        out[str(case)] = (layer._comm_mode(), getattr(replicated, "sequence_parallel", None),
                          getattr(sharded, "sequence_parallel", False))
    return out


def test_only_a_reduce_scattered_replicated_factor_is_marked_sequence_parallel():
    from tests.distributed.layer_cases import Case

    expected = {
        Case("column", sp=True): ("reduce_scatter", True),
        Case("row", sp=True): ("reduce_scatter", True),
        Case("column"): ("all_reduce", False),
        Case("row"): ("all_reduce", False),
        Case("column", sp=True, bias=False, expert=True): ("partial", True),
        Case("row", sp=True, bias=True, skip_bias_add=True, expert=True): ("partial", True),
        Case("column", bias=False, expert=True): ("rider_only", False),  # no SP: no per-step sum
        Case("column", bias=True, disable_grad_reduce=True): ("rider_only", False),
    }
    got = run_distributed(marking_worker, 2, list(expected), tp=2)[0]
    for case, (mode, marked) in expected.items():
        assert got[str(case)][:2] == (mode, marked), case
        assert not got[str(case)][2], f"{case}: the sharded factor is never summed over TP"



def allreduce_worker(etp):
    """Expert layers at TP=2 with expert-TP ``etp``: the factors' DDP group flag and the base's."""
    import torch
    from megatron.core import ModelParallelConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRAConfig, LoRARowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=etp,
                              use_cpu_initialization=True, perform_initialization=False)
    out = {}
    for cls, extra in ((LoRAColumnParallelLinear, {}),
                       (LoRARowParallelLinear, dict(input_is_parallel=True, skip_bias_add=True))):
        layer = cls(16, 24, config=cfg, init_method=torch.nn.init.zeros_, bias=False, is_expert=True,
                    lora_config=LoRAConfig(rank=4), lora_init_name="decoder.layers.0.mlp.experts.0.fc", **extra)
        out[cls.__name__] = (layer.weight.allreduce, layer.lora_A.allreduce, layer.lora_B.allreduce)
    return out


@pytest.mark.parametrize("etp", [1, 2])
def test_expert_factors_are_reduced_over_the_expert_data_parallel_group(etp):
    """Expert factors are always reduced over the expert-DP group (``allreduce = False``): each
    rank's experts see its own tokens. megatron-core 0.16 marks the base weight ``allreduce=True``
    at TP=2, ETP=1, EP=1, where the two TP ranks are expert data parallel (0.19 does not); the
    factors must not copy that."""
    got = run_distributed(allreduce_worker, 2, etp, tp=2, expert_tensor_parallel_size=etp)[0]
    for name, (base, a, b) in got.items():
        assert a is False and b is False, (name, base, a, b)


def gtp_worker():
    import torch
    from megatron.core import ModelParallelConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRAConfig

    cfg = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False)
    try:
        LoRAColumnParallelLinear(16, 24, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                 lora_config=LoRAConfig(rank=4), lora_init_name="decoder.layers.0.x")
    except ValueError as err:
        return str(err)
    return None


def _has_gtp() -> bool:
    import inspect

    from megatron.core import parallel_state

    return "gtp_remat_size" in inspect.signature(parallel_state.initialize_model_parallel).parameters


@pytest.mark.skipif(not _has_gtp(), reason="GTP weight rematerialisation needs megatron-core >= 0.19")
def test_gtp_sharded_base_weight_is_refused_by_name():
    """megatron-core 0.19 can shard a layer's weight over a gtp_remat group and gather it inside
    its own forward; the LoRA operators multiply the local weight, so such a layer is refused."""
    message = run_distributed(gtp_worker, 2, gtp_remat_size=2)[0]
    assert message is not None and "GTP-sharded (gtp_remat_size=2" in message
