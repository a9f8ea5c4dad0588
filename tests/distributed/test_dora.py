"""DoRA under TP / SP / PP with the frozen base's collectives (docs/design.md §18).

References:
* layers: DoRA's formula in unsharded plain torch (``dora_cases.reference``: W, A, B, m,
  ``m / ‖W + s B A‖ * (X W'^T) + b``, the norm detached) at TP = 1, 2, 4 with SP, bias,
  skip_bias_add, gather_output, input_is_parallel, dropout, a column expert layer and the
  external-GEMM (Transformer Engine) layers; the magnitude's init is the base's fp64 row norm;
* the tiny GPT: DoRA at TP=1 in a plain loop. TP=2, TP=2+SP (Megatron DDP), PP=2 and
  per-projection DoRA follow its losses (≤ 1e-5 relative) and its adapter; replicated tensors
  (row layers' magnitude and lora_B) are bitwise equal on the TP ranks;
* collectives: one forward + backward of the DoRA GPT issues the frozen base's calls in the same
  order; its bytes are the LoRA model's plus the appended [out] norm vectors of the row layers
  only. A norm on its own all-reduce must fail that check (the negative control);
* checkpoints: a DoRA adapter saved at TP=2 loads at TP=1 and TP=4 (dist checkpoint and full file)
  bitwise; use_dora must match, and a descriptor without it reads as LoRA.
"""

import os

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import dora_cases as D
from tests.distributed import gpt_cases as G
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK, TINY_GPT

CFG = LoRAConfig(rank=RANK, alpha=8, use_dora=True)
CASES = [L.Case("column"), L.Case("column", bias=False, gather_output=True), L.Case("column", sp=True),
         L.Case("column", skip_bias_add=True), L.Case("row"), L.Case("row", input_is_parallel=False),
         L.Case("row", sp=True), L.Case("row", skip_bias_add=True),
         # the dispatcher reduces a column expert layer's dX; its norm needs no communication
         L.Case("column", bias=False, expert=True), L.Case("column", sp=True, bias=False, expert=True),
         L.Case("column", disable_grad_reduce=True),
         L.Case("column", dropout=0.5), L.Case("row", sp=True, dropout=0.5)]
T = D.logical_tensors()
STEPS = 8
_cache = {}


def cached(key, make):
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


# ------------------------------------------------------------------------------------- layers

def layer_results(tp):
    return cached(("layers", tp), lambda: run_distributed(
        D.worker_cases, tp, CASES, T, LoRAConfig(rank=RANK, alpha=8, dropout=0.5, use_dora=True), tp == 2, tp=tp))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dora_layer_matches_unsharded_reference(case, tp):
    ranks = [r[CASES.index(case)] for r in layer_results(tp)]
    mask = L.logical_mask(case.kind, case.dropout, seed=7) if case.dropout else None
    got, ref = D.assemble(case, ranks), D.reference(case, T, CFG.scaling, mask)
    for key in ("y", "dx", "dA", "dB", "dm"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert all(r["weight_grad"] is None for r in ranks), "frozen base weight got a gradient"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_magnitude_init_is_the_base_row_norm_at_any_tp(tp):
    """m = ‖W‖ per output feature, from the fp64 sum (a row layer's over its TP group): the TP=1
    value, bitwise, at every TP size."""
    want = T["weight"].double().norm(dim=1).float()
    for case in CASES:
        got = D.assemble(case, [r[CASES.index(case)] for r in layer_results(tp)])["init"]
        assert torch.equal(got, want), (case, (got - want).abs().max())


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "row" and not c.sp], ids=str)
def test_replicated_magnitude_grad_bitwise_identical_on_tp_ranks(case):
    """Without SP a row layer's dm is complete on every rank (like its lora_B's gradient)."""
    grads = [r[CASES.index(case)]["dm"] for r in layer_results(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dora_layer_issues_exactly_the_base_collectives(case):
    """The LoRA layer's calls, which are the base's except where LoRA's rider has no reduction of the
    layer's to ride in ("rider_only": a column expert without SP, disable_grad_reduce)."""
    rider_only = case.caller_reduces and not case.sp
    for rank in layer_results(2):
        calls = rank[CASES.index(case)]["calls"]
        assert calls["dora"] == calls["lora"], calls
        assert (calls["dora"] == calls["base"]) != rider_only, calls


@pytest.mark.parametrize("kind, fused_norm, sp", [("column", True, True), ("row", False, False), ("row", False, True)])
def test_external_gemm_dora_matches_unsharded_reference(kind, fused_norm, sp):
    """The Transformer Engine layers' path (a foreign GEMM between the operators; TE's bias returned
    and added after the scale) at TP=2."""
    t = D.logical_tensors(norm=fused_norm)
    ranks = cached(("external", kind, fused_norm, sp),
                   lambda: run_distributed(D.external_worker, 2, kind, fused_norm, sp, t, CFG, tp=2))
    case = L.Case(kind, sp=sp)
    got, ref = D.assemble(case, ranks), D.reference(case, t, CFG.scaling, fused_norm=fused_norm)
    for key in ("y", "dx", "dA", "dB", "dm"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert all(r["counts"] == r["base_counts"] for r in ranks), ranks[0]["counts"]


def test_bf16_dora_layers_track_the_fp32_reference():
    """bf16 parameters and activations at TP=2 (a row layer's norm sums then travel in a bf16
    message): within bf16 rounding of the fp32 reference (measured: at most 0.7 % of each tensor's
    largest entry; bf16 keeps 8 bits)."""
    cases = [L.Case("column", sp=True), L.Case("row"), L.Case("row", sp=True)]
    ranks = cached("bf16", lambda: run_distributed(D.bf16_worker, 2, cases, T, CFG, tp=2))
    rounded = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in T.items()}
    for i, case in enumerate(cases):
        got, ref = D.assemble(case, [r[i] for r in ranks]), D.reference(case, rounded, CFG.scaling)
        for key in ("y", "dx", "dA", "dB", "dm"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1.5e-2 * ref[key].abs().max().item(),
                                       msg=lambda m: f"{case} {key}: {m}")


def test_dora_is_refused_where_the_row_reduction_is_outside_the_layer():
    messages = cached("refused", lambda: run_distributed(D.refusal_worker, 2, tp=2))
    for message in messages[0].values():
        assert message is not None and "DoRA" in message and "\n" not in message, messages[0]
    assert "decoder.layers.0.test" in messages[0]["row expert"]
    assert "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2" in messages[0]["moe expert fc2"]
    assert "--expert-tensor-parallel-size 1" in messages[0]["moe expert fc2"]
    assert "router" in messages[0]["router"]


# -------------------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def base_state():
    return G.base_state()


LAYOUTS = {  # name: (world, run_distributed kwargs, G.train options)
    "tp1": (1, {}, {}),
    "tp2": (2, dict(tp=2), {}),
    "tp2-sp-ddp": (2, dict(tp=2), dict(loop="ddp", path="spec", sp=True)),
    "tp1-per-projection": (1, {}, dict(per_projection=True)),
    "tp2-per-projection": (2, dict(tp=2), dict(per_projection=True)),
    "tp2-recompute": (2, dict(tp=2), dict(recompute_branch_input=True)),  # the branch input recomputed
}
TENSORS = G.ADAPTER_TENSORS * 3 // 2  # A, B and m of every target of every layer
# Adam's normalised step amplifies gradient rounding where a gradient is near zero: measured up
# to 2.2e-5 absolute (2 of 384 entries of linear_qkv's stacked lora_A) with per-projection DoRA.
ADAPTER_TOLERANCE = {"tp2-per-projection": dict(rtol=1e-3, atol=1e-4)}


def model_run(base_state, name):
    def make():
        world, kwargs, options = LAYOUTS[name]
        options = dict(options)
        cfg = D.dora_cfg(per_projection=options.pop("per_projection", False),
                         recompute_branch_input=options.pop("recompute_branch_input", False))
        return run_distributed(G.train_worker, world, base_state, {**options, "steps": STEPS, "cfg": cfg}, **kwargs)
    return cached(("model", name), make)


def pp_run(base_state):
    return cached("pp2", lambda: run_distributed(D.pp_train_worker, 2, base_state, D.dora_cfg(), STEPS, pp=2))


@pytest.mark.parametrize("name", ["tp2", "tp2-sp-ddp", "tp2-per-projection", "tp2-recompute"])
def test_dora_gpt_matches_tp1(base_state, name):
    ref = model_run(base_state, "tp1-per-projection" if "per-projection" in name else "tp1")
    assert ref[0]["losses"][-1] < ref[0]["losses"][1] - 0.05, ref[0]["losses"]  # DoRA learns
    ranks = model_run(base_state, name)
    for r in ranks:
        G.assert_same_trajectory(r["losses"], ref[0]["losses"])
    G.assert_same_logical_adapter(ranks, ref, tensors=TENSORS, **ADAPTER_TOLERANCE.get(name, {}))
    assert G.replicated_mismatches(ranks) == []


def test_dora_gpt_magnitude_trains(base_state):
    """m leaves its init (‖W‖) in every layer: its gradient reaches it."""
    adapter = G.logical_adapter(model_run(base_state, "tp1"))
    for key, m in adapter.items():
        if key.endswith("lora_magnitude"):
            init = base_state[key.replace("lora_magnitude", "weight")].double().norm(dim=1).float()
            assert (m - init).abs().max() > 1e-4, key


def test_dora_gpt_pp2_matches_tp1(base_state):
    ref = model_run(base_state, "tp1")
    ranks = pp_run(base_state)
    assert ranks[0]["losses"] == [] and len(ranks[1]["losses"]) == STEPS
    G.assert_same_trajectory(ranks[1]["losses"], ref[0]["losses"])
    got = {**ranks[0]["adapter"], **ranks[1]["adapter"]}
    want = ref[0]["adapter"]
    assert got.keys() == want.keys() and len(got) == TENSORS
    for key, (tensor, _, _) in want.items():
        torch.testing.assert_close(got[key][0], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_dora_te_spec_matches_local_tp1():
    """Megatron's TE spec on the CPU double of Transformer Engine (``tests/te_double.py``) at TP=2
    with SP, DDP and linear biases (TE returns the row bias, added after the scale): the local-spec
    TP=1 DoRA trajectory and adapter."""
    overrides = dict(add_bias_linear=True)
    base = G.base_state(overrides)
    options = {"steps": STEPS, "cfg": D.dora_cfg(), "config_overrides": overrides}
    ref = cached("te-ref", lambda: run_distributed(G.train_worker, 1, base, options))
    ranks = run_distributed(G.train_worker, 2, base, {**options, "transformer_impl": "transformer_engine",
                                                       "loop": "ddp", "sp": True}, tp=2, te_double=True)
    assert ranks[0]["lora_classes"] == ["LoRATELayerNormColumnParallelLinear", "LoRATERowParallelLinear"]
    for r in ranks:
        G.assert_same_trajectory(r["losses"], ref[0]["losses"])
    G.assert_same_logical_adapter(ranks, ref, tensors=TENSORS)
    assert G.replicated_mismatches(ranks) == []


def test_dora_moe_sequential_experts_at_expert_tp1_match_tp1(tmp_path):
    """SequentialMLP experts at expert-TP 1 under TP=2 + SP (their rows are whole: the norm is
    local), DDP, against one rank: losses and trained logits."""
    from tests.distributed import moe_cases as M

    base = str(tmp_path / "base")
    os.makedirs(base)
    run_distributed(M.save_base_worker, 1, base)
    ref = run_distributed(M.run_worker, 1, base, dict(dora=True))[0]
    ranks = run_distributed(M.run_worker, 2, base, dict(dora=True, sp=True, loop="ddp"), **M.dist_kwargs(dict(tp=2)))
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    magnitudes = [k for k in ref["adapter"] if k.endswith("lora_magnitude")]
    assert len(magnitudes) == 2 * (2 + 2 * M.EXPERTS)  # layers x (qkv, proj, experts x (fc1, fc2))
    assert ref["losses"][-1] < ref["losses"][0]


# -------------------------------------------------------------------------------- collectives

ROW_CALLS = TINY_GPT["num_layers"] * 2  # linear_proj and linear_fc2, one forward each
HIDDEN_BYTES = TINY_GPT["hidden_size"] * 4  # one fp32 [out] vector of a row layer


def collectives(base_state):
    return cached("collectives", lambda: run_distributed(D.collectives_worker, 2, base_state, tp=2))


def assert_frozen_base_collectives(dora, lora, base, tail_bytes):
    """The DoRA model's calls are the frozen base's, in order; its bytes the LoRA model's, plus one
    appended [out] norm vector (t copies under SP) in each row layer's forward reduction."""
    names = [n for n, _ in base]
    assert [n for n, _ in dora] == names, f"DoRA issues {len(dora)} collectives, the frozen base {len(base)}"
    assert [n for n, _ in lora] == names
    extra = [d - b for (_, d), (_, b) in zip(dora, lora)]
    assert sorted(extra) == [0] * (len(extra) - ROW_CALLS) + [tail_bytes] * ROW_CALLS, extra


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_dora_gpt_issues_the_frozen_base_collectives(base_state, sp):
    for rank in collectives(base_state):
        runs = rank[sp]
        assert_frozen_base_collectives(runs["dora"], runs["lora"], runs["base"], HIDDEN_BYTES * (2 if sp else 1))


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_harness_bites_a_norm_with_its_own_all_reduce(base_state, sp):
    """Negative control: the same numbers, one all-reduce more per row layer: the check fails."""
    runs = collectives(base_state)[0][sp]
    with pytest.raises(AssertionError, match="collectives"):
        assert_frozen_base_collectives(runs["broken"], runs["lora"], runs["base"], HIDDEN_BYTES * (2 if sp else 1))


# -------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def saved(base_state, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dora"))
    return root, run_distributed(D.save_worker, 2, base_state, root, 3, tp=2)[0]


@pytest.mark.parametrize("how", ["dist", "full"])
@pytest.mark.parametrize("tp", [1, 4])
def test_tp2_dora_adapter_loads_at_other_tp(base_state, saved, tp, how):
    root, ref = saved
    got = run_distributed(D.load_worker, tp, base_state, root, how, tp=tp)[0]
    assert len(ref["adapter"]) == TENSORS
    for key, value in ref["adapter"].items():
        assert torch.equal(got["adapter"][key], value), key
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)


def test_merge_folds_the_magnitude_and_unmerge_restores_the_base(saved):
    """At TP=2: merge writes (m / n) * (W + s B A) per row (a row layer's n summed over TP), so the
    plain base forward gives the DoRA logits; unmerge gives back the base's bits."""
    merge = saved[1]["merge"]
    assert merge["changed"] and merge["restored"] and merge["after_gap"] == 0.0, merge
    assert merge["merged_gap"] <= 1e-5 * merge["scale"], merge


def test_use_dora_must_match_and_old_descriptors_read_as_lora(base_state, saved):
    root, _ = saved
    errors = run_distributed(D.config_mismatch_worker, 1, base_state, root)[0]
    assert errors["old_into_lora"] is None
    for case in ("old_into_dora", "dora_into_lora", "dora_file_into_lora"):
        message = errors[case]
        assert message and "use_dora" in message and "--lora-use-dora" in message and "\n" not in message, (case, message)
    assert "model has True, checkpoint has False" in errors["old_into_dora"]
