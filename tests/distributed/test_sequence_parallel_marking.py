"""Which replicated factor ``finalize_model_grads`` sums over TP (docs/design.md §3).

Megatron's ``finalize_model_grads`` all-reduces over TP every parameter marked
``sequence_parallel`` when the config has SP. A replicated LoRA factor must be marked exactly when
its gradient is a per-sequence-chunk partial sum, i.e. when the layer's one collective is a
reduce-scatter. An expert layer with explicit expert communication keeps its SP flag but issues
no reduce-scatter: its rider gets its own all-reduce, so its gradient is already complete and
summing it again would multiply it by the TP size.
"""

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
        Case("column", sp=True, bias=False, expert=True): ("rider_only", False),
        Case("row", sp=True, bias=True, skip_bias_add=True, expert=True): ("rider_only", False),
        Case("column", bias=True, disable_grad_reduce=True): ("rider_only", False),
    }
    got = run_distributed(marking_worker, 2, list(expected), tp=2)[0]
    for case, (mode, marked) in expected.items():
        assert got[str(case)][:2] == (mode, marked), case
        assert not got[str(case)][2], f"{case}: the sharded factor is never summed over TP"

