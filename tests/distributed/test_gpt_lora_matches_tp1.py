"""A GQA + SwiGLU + RMSNorm GPT with LoRA on all four targets, 10 AdamW steps per layout.

Reference: TP=1 in a plain PyTorch loop. Every other layout (TP=2, TP=4, plain loop; TP=2 with
and without SP through Megatron's DDP + finalize_model_grads + get_megatron_optimizer) must give
the same loss trajectory (~1e-5 relative) and the same gathered logical adapter, and every
replicated LoRA tensor must be bitwise identical on all TP ranks.
"""

import pytest
import torch

from tests.distributed import breakages
from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed

STEPS = 10
LAYOUTS = {  # name: (world size, train_worker kwargs)
    "tp1-plain": (1, dict()),
    "tp2-plain": (2, dict()),
    "tp4-plain": (4, dict()),
    "tp1-ddp": (1, dict(loop="ddp", path="spec")),
    "tp2-ddp": (2, dict(loop="ddp", path="spec")),
    "tp2-sp-ddp": (2, dict(loop="ddp", path="spec", sp=True)),
    # Megatron's gradient_accumulation_fusion: the factors write DDP's main_grad themselves.
    "tp2-sp-ddp-fused": (2, dict(loop="ddp", path="spec", sp=True, grad_fusion=True, overlap=True)),
}
_runs = {}


@pytest.fixture(scope="module")
def base_state():
    return G.base_state()


def run(base_state, name, **extra):
    key = (name, tuple(sorted(extra.items())))
    if key not in _runs:
        world, kwargs = LAYOUTS[name]
        _runs[key] = run_distributed(G.train_worker, world, base_state,
                                     {**kwargs, "steps": STEPS, **extra}, tp=world)
    return _runs[key]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1-plain"])
def test_loss_trajectory_matches_tp1(base_state, name):
    ref = run(base_state, "tp1-plain")[0]["losses"]
    ranks = run(base_state, name)
    assert len(ref) == STEPS and ref[-1] < 0.97 * ref[1]  # LoRA actually learns (same batch parity)
    for r in ranks:
        G.assert_same_trajectory(r["losses"], ref)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1-plain"])
def test_gathered_adapter_matches_tp1(base_state, name):
    ref = G.assert_same_logical_adapter(run(base_state, name), run(base_state, "tp1-plain"))
    assert all(torch.count_nonzero(v) for k, v in ref.items() if k.endswith("lora_B"))


@pytest.mark.parametrize("name", ["tp2-plain", "tp4-plain", "tp2-ddp", "tp2-sp-ddp", "tp2-sp-ddp-fused"])
def test_replicated_lora_tensors_bitwise_identical_on_tp_ranks(base_state, name):
    assert G.replicated_mismatches(run(base_state, name)) == []


def test_grad_norm_counts_replicated_factors_once(base_state):
    """Megatron's clipping norm must be the same at TP=1, TP=2 and TP=2+SP (docs/design.md §10, trap 8)."""
    ref = run(base_state, "tp1-ddp")[0]["norms"]
    for name in ("tp2-ddp", "tp2-sp-ddp"):
        torch.testing.assert_close(torch.tensor(run(base_state, name)[0]["norms"]), torch.tensor(ref),
                                   rtol=1e-4, atol=0)


# ------------------------------------------------------------------ the harness must bite

def _trajectory_differs(got, ref):
    return not torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)


def test_harness_bites_unsummed_replicated_gradient(base_state):
    ranks = run(base_state, "tp2-plain", breakage=breakages.no_rider_sum)
    ref = run(base_state, "tp1-plain")[0]["losses"]
    assert _trajectory_differs(ranks[0]["losses"], ref)
    assert G.replicated_mismatches(ranks), "replicas did not drift although the gradient sum was removed"


def test_harness_bites_unsummed_replicated_gradient_under_sp(base_state):
    ranks = run(base_state, "tp2-sp-ddp", breakage=breakages.no_rider_sum)
    assert _trajectory_differs(ranks[0]["losses"], run(base_state, "tp1-plain")[0]["losses"])


@pytest.mark.parametrize("extra", [dict(fc1_layout="naive"), dict(qkv_layout="thirds")], ids=str)
def test_harness_bites_base_layout_errors(base_state, extra):
    got = run(base_state, "tp2-plain", **extra)[0]["losses"]
    assert _trajectory_differs(got, run(base_state, "tp1-plain")[0]["losses"])


def test_harness_bites_naive_swiglu_adapter_gather(base_state):
    """Gathering linear_fc1's lora_B as a plain concat permutes rows: the comparison must fail."""
    ref = G.logical_adapter(run(base_state, "tp1-plain"))
    naive = G.logical_adapter(run(base_state, "tp2-plain"), unshard_gated=False)
    key = "decoder.layers.0.mlp.linear_fc1.lora_B"
    assert not torch.allclose(naive[key], ref[key], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_fusion_is_bitwise_the_unfused_run(base_state):
    """Fused accumulation into main_grad (with overlap_grad_reduce) changes no bit (docs/design.md §10, trap 7)."""
    plain, fused = run(base_state, "tp2-sp-ddp"), run(base_state, "tp2-sp-ddp-fused")
    for a, b in zip(plain, fused):
        assert a["losses"] == b["losses"] and a["norms"] == b["norms"]
        for key, (tensor, _, _) in a["adapter"].items():
            assert torch.equal(b["adapter"][key][0], tensor), key
