"""LoRA on Megatron-Core's Transformer Engine spec, run on CPU through a TE test double.

The TE LoRA layers (``te_layers.py``) run here unchanged inside Megatron-Core's own TE wrappers
(``megatron/core/extensions/transformer_engine.py``), built by Megatron's TE GPT spec, with
``tests/te_double.py`` standing in for the CUDA-only ``transformer_engine`` package (TE's
module attributes, output tuples and TP communication, read from TE's source).

References:
* layers: plain unsharded torch (``external_cases.reference``), for every TE LoRA class with the
  bias added or returned (skip_bias_add), at TP=1, 2 and 2+SP; and the plain TE layer's own
  collectives, which the LoRA layer must match call for call;
* GPT: the local-spec GPT at TP=1 (tests/distributed/test_gpt_lora_matches_tp1.py checks it
  against every local layout; test_apply_lora against transformers + peft). Every TE layout
  (Megatron's plain TE spec + apply_lora, or the LoRA TE spec; plain loop or DDP with SP and
  gradient-accumulation fusion; biases) must give the same loss trajectory and logical adapter;
* checkpoints: base and adapters moving between the specs through dist checkpoints.

What the double cannot show (real TE kernels, FP8, bf16, speed) is tests/gpu's job on a GPU.
"""

import pytest

from megatron_lora import LoRAConfig
from tests.distributed import gpt_cases as G
from tests.distributed import layer_cases as L
from tests.distributed import te_double_cases as T
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK

STEPS = 10
TE = dict(transformer_impl="transformer_engine")
TE_GPT_CLASSES = ["LoRATELayerNormColumnParallelLinear", "LoRATERowParallelLinear"]
LAYOUTS = {  # name: (world size, train_worker kwargs)
    "te-tp1-apply": (1, dict(TE)),  # Megatron's plain TE spec, converted by apply_lora
    "te-tp2-apply": (2, dict(TE)),
    "te-tp2-ddp": (2, dict(TE, loop="ddp", path="spec")),
    "te-tp2-sp-ddp-fused": (2, dict(TE, loop="ddp", path="spec", sp=True, grad_fusion=True, overlap=True)),
    # Linear biases: TE returns them (skip_bias_add) or adds them; a row bias after the reduction.
    "te-tp2-sp-bias": (2, dict(TE, loop="ddp", sp=True, config_overrides=dict(add_bias_linear=True))),
}
_cache = {}


def cached(key, make):
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


@pytest.fixture(scope="module")
def base_state():
    return G.base_state()


def reference(overrides=None):
    """The local spec at TP=1 on the same base: losses and logical adapter."""
    return cached(("ref", str(overrides)), lambda: run_distributed(
        G.train_worker, 1, G.base_state(overrides), {"steps": STEPS, "config_overrides": overrides}))


def run(name):
    world, kwargs = LAYOUTS[name]
    base = G.base_state(kwargs.get("config_overrides"))
    return cached(name, lambda: run_distributed(G.train_worker, world, base, {**kwargs, "steps": STEPS},
                                                tp=world, te_double=True))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_te_spec_trajectory_and_adapter_match_local_tp1(name):
    ref_run = reference(LAYOUTS[name][1].get("config_overrides"))
    ref_losses = ref_run[0]["losses"]
    ranks = run(name)
    assert ranks[0]["lora_classes"] == TE_GPT_CLASSES
    assert ref_losses[-1] < ref_losses[1] - 0.05  # LoRA learns
    for r in ranks:
        G.assert_same_trajectory(r["losses"], ref_losses)
    G.assert_same_logical_adapter(ranks, ref_run)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if LAYOUTS[n][0] > 1])
def test_replicated_factors_bitwise_identical_on_tp_ranks(name):
    assert G.replicated_mismatches(run(name)) == []


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_lora_issues_the_collectives_of_the_base_te_model(base_state, sp):
    """TE's own communication in the base model vs ours in the LoRA model: same calls."""
    ranks = run_distributed(T.collective_counts_worker, 2, base_state, sp, tp=2, te_double=True)
    for r in ranks:
        assert r["lora"] == r["base"], r
        assert sum(r["base"][0].values()) > 0 and sum(r["base"][1].values()) > 0


def test_checkpoints_and_adapters_move_between_te_and_local_spec_at_tp2(base_state, tmp_path):
    """A local-spec base dist checkpoint loads into the TE spec; a TE adapter (dist checkpoint)
    loads into the local spec and a local one (full adapter) into the TE spec; merge and unmerge
    on TE layers keep the logits. Same logits at every hand-over."""
    for r in run_distributed(T.exchange_worker, 2, base_state, str(tmp_path), tp=2, te_double=True):
        assert max(r["te_to_local"], r["local_to_te"], r["merged"], r["unmerged"]) < 1e-5, r
        assert r["names_equal"] and r["te_classes"] == TE_GPT_CLASSES, r


# ------------------------------------------------------------------------------ single TE layers

LAYER_CFG = LoRAConfig(rank=RANK, alpha=8.0, target_modules=("linear_qkv",))
LAYER_T = L.logical_tensors(norm=True)


def layer_run(tp, sp):
    return cached(("layers", tp, sp), lambda: run_distributed(
        T.te_layers_worker, tp, sp, LAYER_T, LAYER_CFG, tp=tp, te_double=True))


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_te_layers_match_unsharded_reference(tp, sp):
    """Each TE LoRA class (fused norm, plain column, row), bias added by it or returned
    (skip_bias_add): output and gradients equal plain unsharded torch."""
    per_rank = layer_run(tp, sp)
    for kind, fused_norm, skip in per_rank[0]:
        ranks = [r[(kind, fused_norm, skip)] for r in per_rank]
        ref = L.reference(L.Case(kind), LAYER_T, LAYER_CFG.scaling, fused_norm=fused_norm)
        L.assert_matches(L.assemble(L.Case(kind, sp=sp), ranks), ref,
                         f"{kind} fused_norm={fused_norm} skip_bias_add={skip}: ")


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_te_layers_issue_the_collectives_of_the_plain_te_layers(sp):
    for r in layer_run(2, sp):
        for key, result in r.items():
            assert result["counts"] == result["base_counts"], key
