"""Per-projection LoRA (issue 18): one rank-r A per projection of linear_qkv (q, k, v) and of the
gated linear_fc1 (gate, up), under TP, SP, DDP and dist checkpoints.

Reference: TP=1 in a plain loop, as in ``test_gpt_lora_matches_tp1.py``. TP=2 (surgery path,
plain loop) and TP=2 + SP (LoRA spec, Megatron DDP, with and without gradient-accumulation
fusion), and the Transformer Engine spec on the CPU double of TE (``test_te_double.py``), must
give the same losses (~1e-5) and the same gathered adapter, the replicated factors bitwise
identical on both ranks. lora_B is compact, [out/t, r], by construction: no parameter
holds the off-block entries of the block B the operators multiply.
"""

import pytest
import torch

from tests.distributed import gpt_cases as G
from tests.distributed import per_projection_cases as P
from tests.distributed.launcher import run_distributed

STEPS = 6
LAYOUTS = {
    "tp1-plain": (1, dict()),
    "tp2-plain": (2, dict()),
    "tp2-sp-ddp": (2, dict(loop="ddp", path="spec", sp=True)),
    "tp2-sp-ddp-fused": (2, dict(loop="ddp", path="spec", sp=True, grad_fusion=True, overlap=True)),
    "te-tp2-apply": (2, dict(transformer_impl="transformer_engine")),
    "te-tp2-sp-ddp-fused": (2, dict(transformer_impl="transformer_engine", loop="ddp", path="spec", sp=True,
                                    grad_fusion=True, overlap=True)),
}
# Adam turns reduction-order noise in a near-zero gradient entry into visible noise in its
# factor (the update is lr * g / (|g| + eps)). On the TE double under SP, one qkv lora_B entry,
# gradient 1.8e-7 at step 1 (the gradients agree to 5e-9), ends 1.2e-5 from TP=1 after 6 steps:
# that layout is held to the script-level adapter tolerance of docs/design.md §11. The TE double
# without SP ends up to 1.6e-5 off on some CPUs (the rounding depends on the machine's kernels).
ADAPTER_TOLERANCE = {"te-tp2-sp-ddp-fused": dict(rtol=1e-3, atol=1e-4), "te-tp2-apply": dict(rtol=1e-3, atol=1e-4)}
_runs = {}


@pytest.fixture(scope="module")
def base_state():
    return G.base_state()


def run(base_state, name):
    if name not in _runs:
        world, kwargs = LAYOUTS[name]
        options = {**kwargs, "steps": STEPS, "cfg": P.PER_PROJECTION}
        _runs[name] = run_distributed(G.train_worker, world, base_state, options, tp=world,
                                      te_double=name.startswith("te-"))
    return _runs[name]


def test_factors_are_stacked_a_and_compact_b(base_state):
    adapter = run(base_state, "tp2-plain")[0]["adapter"]
    layer = "decoder.layers.0."
    shapes = {k[len(layer):]: tuple(v[0].shape) for k, v in adapter.items() if k.startswith(layer)}
    # hidden 32; qkv: (8 heads + 2 x 4 groups) x 4 = 64 rows; fc1 [gate; up] 2 x 64; TP=2 shards B's rows
    assert shapes == {"self_attention.linear_qkv.lora_A": (12, 32), "self_attention.linear_qkv.lora_B": (32, 4),
                      "self_attention.linear_proj.lora_A": (4, 16), "self_attention.linear_proj.lora_B": (32, 4),
                      "mlp.linear_fc1.lora_A": (8, 32), "mlp.linear_fc1.lora_B": (64, 4),
                      "mlp.linear_fc2.lora_A": (4, 32), "mlp.linear_fc2.lora_B": (32, 4)}


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1-plain"])
def test_per_projection_trajectory_and_adapter_match_tp1(base_state, name):
    ref = run(base_state, "tp1-plain")
    losses = ref[0]["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.99 * losses[1]  # it learns
    ranks = run(base_state, name)
    if name.startswith("te-"):
        assert ranks[0]["lora_classes"] == ["LoRATELayerNormColumnParallelLinear", "LoRATERowParallelLinear"]
    for r in ranks:
        G.assert_same_trajectory(r["losses"], losses)
    adapter = G.assert_same_logical_adapter(ranks, ref, **ADAPTER_TOLERANCE.get(name, {}))
    assert all(torch.count_nonzero(v) for k, v in adapter.items() if k.endswith("lora_B"))
    assert G.replicated_mismatches(ranks) == []


def test_per_projection_gradient_accumulation_fusion_is_bitwise_the_unfused_run(base_state):
    """lora_B reaches the operators as a block tensor, so its gradient goes through autograd and
    DDP's hook while lora_A's is fused into main_grad: together bitwise the unfused run."""
    plain, fused = run(base_state, "tp2-sp-ddp"), run(base_state, "tp2-sp-ddp-fused")
    for a, b in zip(plain, fused):
        assert a["losses"] == b["losses"] and a["norms"] == b["norms"]
        assert all(torch.equal(b["adapter"][k][0], t) for k, (t, _, _) in a["adapter"].items())


@pytest.fixture(scope="module")
def checkpoints(base_state, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("per_projection"))
    saved = run_distributed(P.save_worker, 2, base_state, root, tp=2)
    loaded = run_distributed(P.load_worker, 1, base_state, root, tp=1)
    return saved, loaded[0]


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1(checkpoints):
    saved, loaded = checkpoints
    want = G.logical_adapter(saved)
    assert len(want) == G.ADAPTER_TENSORS
    assert all(torch.equal(loaded["adapter"][k][0], t) for k, t in want.items())


@pytest.mark.parametrize("label", ["per-projection dist into stacked", "per-projection full into stacked",
                                   "stacked dist into per-projection", "stacked full into per-projection"])
def test_checkpoint_of_the_other_setting_is_refused(checkpoints, label):
    message = checkpoints[1]["errors"].get(label)
    assert message is not None, f"{label}: loaded without an error"
    assert "another LoRA config" in message and "per_projection: model has" in message, message
    assert "--lora-per-projection" in message
