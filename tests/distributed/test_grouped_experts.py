"""LoRA on grouped MoE experts (``core/grouped_experts.py``): Megatron's TEGroupedMLP, whose
``linear_fc1`` / ``linear_fc2`` are TE GroupedLinears, on CPU through tests/te_double.py.

References:
* layer: plain per-expert torch written here (``grouped_cases.reference``): each expert's rows
  ``x_e W_e^T + s (x_e A_e^T) B_e^T``, outputs and every gradient, an expert with no tokens
  included, at expert-TP 1 and 2 (the ranks' partial sums and shards assembled by the layout, as
  the token dispatcher's reduce-scatter / all-gather would);
* model: the same tiny MoE GPT with SequentialMLP experts on the local spec (whose expert LoRA
  layers are the local layers tested everywhere else), on the same base weights.
"""

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import grouped_cases as GC
from tests.distributed.launcher import run_distributed

LAYER_CFG = LoRAConfig(rank=GC.RANK, alpha=8.0, seed=11)


def _assemble(ranks):
    """The logical tensors of the ranks' results: partial sums summed, shards concatenated."""
    from megatron_lora.core.layout import unshard_tensors

    def total(key):
        return sum(r[key] for r in ranks)

    def joined(key, dim, gated=False):
        return unshard_tensors([r[key] for r in ranks], dim, gated=gated)

    return dict(y1=joined("y1", 1, gated=True), dx1=total("dx1"), dA1=total("dA1"), dB1=joined("dB1", 1, gated=True),
                y2=total("y2"), dx2=joined("dx2", 1), dA2=joined("dA2", 2), dB2=total("dB2"))


@pytest.mark.parametrize("etp", [1, 2], ids=["etp1", "etp2-sp"])
def test_grouped_lora_layers_match_per_expert_reference(etp):
    """fc1 and fc2 of 4 local experts (one with no tokens): outputs and the gradients of the input
    and of both factors equal plain per-expert torch; A is the SequentialMLP experts'; the branch
    is two batched GEMMs forward (four backward) whatever the expert count; the replicated factor
    is marked for finalize_model_grads' sum at expert-TP 2; dropout, DoRA (and expert-TP 2 without
    SP) are refused with a message."""
    t = GC.layer_tensors()
    ranks = run_distributed(GC.layer_worker, etp, t, LAYER_CFG, etp > 1, tp=etp,
                            expert_tensor_parallel_size=etp, te_double=True)
    ref = GC.reference({**t, **GC.logical_a(LAYER_CFG)}, LAYER_CFG.scaling)
    got = _assemble(ranks)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert not ref["dA1"][1].any() and not ref["dB2"][1].any()  # the expert with no tokens
    for r in ranks:
        assert r["world"] == etp and r["init_matches_sequential"] and r["biases"] == (None, None)
        partial = etp > 1
        assert r["flags"] == {"fc1.lora_A": (partial, False, False), "fc1.lora_B": (False, False, True),
                              "fc2.lora_A": (False, False, True), "fc2.lora_B": (partial, False, False)}, r["flags"]
        assert r["forward_gemms"] == {"bmm": 2}, r["forward_gemms"]
        assert r["backward_gemms"] == {"bmm": 4}, r["backward_gemms"]
        assert "dropout" in r["refusals"]["dropout"] and "SequentialMLP" in r["refusals"]["dropout"]
        assert "DoRA" in r["refusals"]["dora"] and "SequentialMLP" in r["refusals"]["dora"]
        if etp > 1:
            assert "sequence_parallel=False" in r["refusals"]["no_sp"], r["refusals"]


@pytest.fixture(scope="module")
def moe_base_state():
    from tests.distributed import gpt_cases as G

    return G.base_state(GC.MOE)


@pytest.mark.parametrize("ep,path", [(1, "apply"), (2, "spec")], ids=["ep1-apply", "ep2-spec"])
def test_grouped_experts_match_sequential_experts(moe_base_state, ep, path, tmp_path):
    """A tiny MoE GPT with TEGroupedMLP experts (TE spec, moe_grouped_gemm) against the same base
    with SequentialMLP experts (local spec): the same adapter after init and the same adapter
    names; after loading one another's full adapter, the same logits and the same adapter
    gradients; merge / unmerge keep the logits; a dist-checkpoint adapter moves from grouped to
    sequential."""
    for r in run_distributed(GC.model_worker, ep, moe_base_state, ep, path, str(tmp_path),
                             expert_model_parallel_size=ep, te_double=True):
        assert r["classes"] == ["LoRATEColumnParallelGroupedLinear", "LoRATELayerNormColumnParallelLinear",
                                "LoRATERowParallelGroupedLinear", "LoRATERowParallelLinear"], r
        assert r["names"] and r["init"] == 0.0, r
        assert r["grad_scale"] > 1e-6 and r["grouped_branch_off"] > 1e-4, r  # what is compared matters
        assert max(r["sequential_to_grouped"], r["grouped_to_sequential"], r["grads"]) < 1e-5, r
        assert max(r["merged"], r["unmerged"], r["dist_grouped_to_sequential"]) < 1e-5, r


def test_optimizer_state_of_grouped_adapters_is_refused_by_name(moe_base_state, tmp_path):
    """Megatron's optimizer checkpoint maps a parameter to one entry; the stacked factors are
    saved per expert, so their optimizer state is refused before Megatron fails inside."""
    messages = run_distributed(GC.optimizer_state_worker, 1, moe_base_state, str(tmp_path), te_double=True)[0]
    assert len(messages) == 2, messages
    for message in messages:
        assert "optimizer state of grouped-expert adapters (LoRATEColumnParallelGroupedLinear, " in message
        assert "--no-save-optim" in message
