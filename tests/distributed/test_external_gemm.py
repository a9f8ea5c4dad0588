"""The TE LoRA layers' TP math on CPU: the ``external_gemm`` operators around a plain-torch GEMM.

TE itself needs CUDA, and NCCL cannot put two ranks on one GPU, so the TP > 1 behaviour of the TE
path is proven here, on the code it shares with the TE layers (everything but ``_local_gemm``):
outputs and gradients equal an unsharded reference at TP = 1, 2 with SP on and off, the fused
norm's output feeds the branch, replicated-factor gradients are bitwise equal across TP ranks,
the collective count is the base layer's, the dropout mask does not depend on TP, and
gradient-accumulation fusion puts the same bits into ``main_grad`` as DDP's own hook.
"""

import dataclasses
import functools

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import external_cases as E
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK

CFG = LoRAConfig(rank=RANK, alpha=8.0, target_modules=("linear_qkv",))
T = L.logical_tensors(norm=True)
LAYERS = [("column", False), ("column", True), ("row", False)]  # (kind, fused norm)
LAYOUTS = [(1, False), (2, False), (2, True)]  # (TP, SP)


@functools.lru_cache(maxsize=None)
def run(kind, fused_norm, tp, sp, dropout=0.0, active=True):
    cfg = dataclasses.replace(CFG, dropout=dropout)
    return run_distributed(E.worker, tp, kind, fused_norm, sp, T, cfg, 7, True, active, tp=tp)


@pytest.mark.parametrize("tp,sp", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind,fused_norm", LAYERS, ids=lambda v: str(v))
def test_matches_unsharded_reference(kind, fused_norm, tp, sp):
    ref = L.reference(L.Case(kind), T, CFG.scaling, fused_norm=fused_norm)
    L.assert_matches(L.assemble(L.Case(kind, sp=sp), run(kind, fused_norm, tp, sp)), ref,
                     "differs from the unsharded reference: ")


@pytest.mark.parametrize("kind,fused_norm", LAYERS, ids=lambda v: str(v))
def test_replicated_factor_grad_bitwise_equal_across_tp_ranks(kind, fused_norm):
    per_rank = run(kind, fused_norm, 2, False)
    name = "dA" if kind == "column" else "dB"
    assert torch.equal(per_rank[0][name], per_rank[1][name])


@pytest.mark.parametrize("sp", (False, True))
@pytest.mark.parametrize("kind,fused_norm", LAYERS, ids=lambda v: str(v))
def test_collectives_are_the_base_layers(kind, fused_norm, sp):
    """Column: SP all-gather forward, one reduction backward; row: one reduction forward, SP
    all-gather backward. LoRA on or off, the count is the same (the rider adds no message)."""
    base_forward = int(sp) if kind == "column" else 1
    base_backward = 1 if kind == "column" else int(sp)
    for active in (True, False):
        counts = {r["counts"] for r in run(kind, fused_norm, 2, sp, active=active)}
        assert counts == {(base_forward, base_backward)}, (active, counts)


@pytest.mark.parametrize("kind,fused_norm", LAYERS, ids=lambda v: str(v))
def test_dropout_does_not_depend_on_tp(kind, fused_norm):
    one, two = run(kind, fused_norm, 1, False, 0.25), run(kind, fused_norm, 2, True, 0.25)
    no_dropout = run(kind, fused_norm, 1, False)
    assert not torch.allclose(one[0]["y"], no_dropout[0]["y"])  # the mask did something
    L.assert_matches(L.assemble(L.Case(kind, sp=True), two), one[0])


def test_lora_keys_match_the_local_layers():
    """Adapters move between local-spec and TE-spec models: the same factor keys."""
    for kind, fused_norm in LAYERS:
        assert run(kind, fused_norm, 2, False)[0]["keys"] == ["layer.lora_A", "layer.lora_B"]


@pytest.mark.parametrize("external", (False, True), ids=("local", "external"))
@pytest.mark.parametrize("kind,sp", [("column", False), ("column", True), ("row", True)], ids=str)
def test_gradient_accumulation_fusion_fills_main_grad_like_ddp(kind, sp, external):
    per_rank = run_distributed(E.fused_main_grad_worker, 2, kind, kind == "column", sp, T, CFG, external,
                               tp=2)
    for (plain, _), (fused, flags) in per_rank:
        assert flags == [True, True]  # DDP's hook will skip its add: no double counting
        for a, b in zip(plain, fused):
            assert torch.equal(a, b)
            assert a.abs().sum() > 0
