"""LoRA layers at TP = 1, 2, 4 against an unsharded plain-torch reference (real gloo ranks).

One spawn per TP size runs every case (SP, gather_output, input_is_parallel, bias, skip_bias_add);
each test then checks one case against ``layer_cases.reference``.
"""

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK

CFG = LoRAConfig(rank=RANK, alpha=8)
CASES = L.all_cases()
DROPOUT_CASES = [L.Case("column", dropout=0.5), L.Case("column", sp=True, dropout=0.5),
                 L.Case("row", dropout=0.5), L.Case("row", sp=True, dropout=0.5)]
T = L.logical_tensors()
_results = {}


def results(tp):
    if tp not in _results:
        _results[tp] = run_distributed(L.worker_all_cases, tp, CASES + DROPOUT_CASES, T,
                                       LoRAConfig(rank=RANK, alpha=8, dropout=0.5), tp=tp)
    return _results[tp]


def per_rank(tp, case):
    index = (CASES + DROPOUT_CASES).index(case)
    return [r[index] for r in results(tp)]


def assert_matches_reference(case, tp, mask=None):
    ranks = per_rank(tp, case)
    L.assert_matches(L.assemble(case, ranks), L.reference(case, T, CFG.scaling, mask))
    assert all(r["weight_grad"] is None for r in ranks), "frozen base weight got a gradient"
    if case.skip_bias_add and case.bias:
        assert all(r["bias_out"] is not None for r in ranks)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_unsharded(case, tp):
    # The dropout cases were run with dropout=0.5 in the config; the others use p=0 through Case.
    assert_matches_reference(case, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_dropout_mask_is_the_logical_mask_at_any_tp(case, tp):
    """The branch mask equals the mask of the logical input as docs/design.md §6 defines it, so TP
    never changes dropout."""
    assert_matches_reference(case, tp, L.logical_mask(case.kind, case.dropout, seed=7))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", [c for c in CASES + DROPOUT_CASES if not c.sp], ids=str)
def test_replicated_factor_grad_bitwise_identical_on_tp_ranks(case, tp):
    """Without SP the replicated factor's gradient must be complete on every rank (docs/design.md §3)."""
    key = "dA" if case.kind == "column" else "dB"
    grads = [r[key] for r in per_rank(tp, case)]
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


COUNT_CASES = [L.Case("column", sp=False), L.Case("column", sp=False, gather_output=True),
               L.Case("column", sp=True), L.Case("row", sp=False), L.Case("row", sp=True),
               L.Case("row", sp=False, input_is_parallel=False),
               # experts under SP with expert-TP = TP: the dispatcher reduces, the layer issues nothing
               L.Case("column", sp=True, bias=False, expert=True),
               L.Case("row", sp=True, bias=True, skip_bias_add=True, expert=True)]
EXPECTED = {  # (forward, backward) collectives of the BASE layer at TP=2, as Megatron issues them
    "column[bias]": (0, 1), "column[gather_output,bias]": (1, 1), "column[sp,bias]": (1, 1),
    "row[input_is_parallel,bias]": (1, 0), "row[sp,input_is_parallel,bias]": (1, 1),
    "row[bias]": (1, 1), "column[sp,expert]": (0, 0), "row[sp,input_is_parallel,bias,skip_bias_add,expert]": (0, 0),
}


@pytest.fixture(scope="module")
def collective_counts():
    return run_distributed(L.worker_count_collectives, 2, COUNT_CASES, tp=2)


@pytest.mark.parametrize("case", COUNT_CASES, ids=str)
def test_lora_layer_issues_exactly_the_base_collectives(collective_counts, case):
    for rank_counts in collective_counts:
        c = rank_counts[COUNT_CASES.index(case)]
        assert c["lora"]["fwd"] == c["base"]["fwd"], c
        assert c["lora"]["bwd"] == c["base"]["bwd"], c
        fwd, bwd = EXPECTED[str(case)]
        assert sum(c["base"]["fwd"].values()) == fwd and sum(c["base"]["bwd"].values()) == bwd, c
        # The rider adds r/h of the message, never a message: at most 25% here (r=4, h=16).
        assert c["lora"]["fwd_bytes"] + c["lora"]["bwd_bytes"] <= 1.25 * (
            c["base"]["fwd_bytes"] + c["base"]["bwd_bytes"]), c


@pytest.mark.parametrize("case", [c for c in COUNT_CASES if not c.sp], ids=str)
def test_harness_bites_a_branch_with_its_own_collectives(collective_counts, case):
    """The count oracle must flag the naive design (branch = its own parallel linears)."""
    c = collective_counts[0][COUNT_CASES.index(case)]
    naive = sum(c["naive"]["fwd"].values()) + sum(c["naive"]["bwd"].values())
    base = sum(c["base"]["fwd"].values()) + sum(c["base"]["bwd"].values())
    assert naive > base, c
