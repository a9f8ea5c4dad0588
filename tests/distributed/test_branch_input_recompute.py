"""``recompute_branch_input``: the branch input is recomputed in backward, not saved; exact.

The tiny GPT (RMSNorm, SwiGLU, GQA) trains 4 AdamW steps with the option off and on, in the same
process from the same weights and RNG state: losses and the adapter must be BITWISE equal (the
recomputation is the same computation), at TP=1, TP=2 and TP=2 + SP (Megatron's DDP), with
dropout on the branch. The bytes autograd keeps for backward (deduplicated by storage,
parameters excluded) must fall by exactly the branch inputs the option stops saving: per layer
the two norm outputs (this rank's sequence chunk under SP) and the SwiGLU output, except layer
0's first norm, whose input (the frozen embedding's output) nobody else keeps.
"""

import logging
import types

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import TINY_GPT

STEPS = 4
FLOAT32 = 4


def saved_activation_bytes(model) -> int:
    """Bytes autograd keeps for one forward's backward: unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs, labels = G.batches(1)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = G._loss(model, inputs, labels)
    del loss
    return sum(kept.values())


def worker_recompute(full_state, sp, dropout):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lora.core.inject import lora_modules

    runs = {}
    for recompute in (False, True):
        cfg = LoRAConfig(rank=4, alpha=8, seed=99, dropout=dropout, recompute_branch_input=recompute)
        model = G.build_lora_gpt(full_state, sp=sp, cfg=cfg)
        sources = sorted(type(m.lora_input_source).__name__ for m in lora_modules(model)
                         if m.lora_input_source is not None)
        torch.manual_seed(11)  # the dropout masks; under SP they come from Megatron's tracker
        model_parallel_cuda_manual_seed(11)
        losses = G.ddp_train(model, STEPS, 1e-2, False, False)[0] if sp else G.plain_train(model, STEPS)
        runs[recompute] = dict(losses=losses, adapter=G.local_adapter(model), sources=sources,
                               saved=saved_activation_bytes(model))
    return runs


LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2-sp": (2, True)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recompute_is_exact_and_saves_the_branch_inputs(layout):
    world, sp = LAYOUTS[layout]
    for rank, runs in enumerate(run_distributed(worker_recompute, world, G.base_state(), sp, 0.1, tp=world)):
        off, on = runs[False], runs[True]
        assert off["sources"] == []
        assert on["sources"] == sorted(["ActivationSource", "NormSource", "NormSource"] * TINY_GPT["num_layers"])
        layers = TINY_GPT["num_layers"]
        assert on["losses"] == off["losses"], f"rank {rank}: losses differ"
        for name, (tensor, _, _) in off["adapter"].items():
            assert torch.equal(on["adapter"][name][0], tensor), f"rank {rank}: {name} differs"
        tokens = G.BATCH * G.SEQ_LEN
        norm_rows = tokens // world if sp else tokens
        norm_out, swiglu_out = norm_rows * TINY_GPT["hidden_size"], tokens * TINY_GPT["ffn_hidden_size"] // world
        expected = (layers * (2 * norm_out + swiglu_out) - norm_out) * FLOAT32
        assert off["saved"] - on["saved"] == expected, \
            f"rank {rank}: saved {off['saved']} -> {on['saved']} bytes"


class _FakeMLP(torch.nn.Module):
    """An MLP whose fc2 input is NOT the activation of the fc1 output (say, a per-token scale)."""

    def __init__(self):
        super().__init__()
        self.linear_fc1 = torch.nn.Identity()
        self.activation_func = torch.nn.functional.silu
        self.config = types.SimpleNamespace(bias_activation_fusion=False, gated_linear_unit=True,
                                            activation_func=torch.nn.functional.silu)


def test_an_activation_it_cannot_reproduce_keeps_the_input_with_one_warning(caplog):
    from megatron_lora.core.recompute import ActivationSource, mlp_activation

    mlp = _FakeMLP()
    source = ActivationSource(mlp, "decoder.layers.0.mlp.linear_fc2")
    z = torch.randn(3, 2, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            fc1_out = mlp.linear_fc1(z)
            x = mlp_activation(mlp.config, mlp.activation_func, fc1_out, None) * 2  # not reproducible
            assert source.take(x) is None
    warnings = [r for r in caplog.records if "decoder.layers.0.mlp.linear_fc2" in r.getMessage()]
    assert len(warnings) == 1
    good = ActivationSource(mlp, "fc2")
    fc1_out = mlp.linear_fc1(z)
    recipe = good.take(mlp_activation(mlp.config, mlp.activation_func, fc1_out, None))
    assert recipe is not None and recipe.tensors[0] is fc1_out


def test_recompute_on_te_layers_is_refused_early():
    from megatron_lora.core import inject

    class FakeTELoRA(inject.LoRALayerMixin, torch.nn.Module):
        pass

    chunk = torch.nn.Module()
    chunk.linear_qkv = FakeTELoRA()
    with pytest.raises(ValueError, match="recompute_branch_input.*FakeTELoRA.*transformer_impl='local'"):
        inject._attach_recompute_sources(chunk, {})


# ----------------------------------------------------------------------------- MoE experts
# SequentialMLP runs every local expert on every forward, an expert that received no token on 0
# rows, and scales each expert's activation by its tokens' routing probabilities before
# linear_fc2. An expert empty on its first forward must stay undecided (an empty bit check proves
# nothing), and the recomputed fc2 input must carry the routing scale.

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall")
STARVED = 3  # the expert that receives no token on the first step (EP=2: rank 1's second expert)
MOE_STEPS = 3
MEGATRON_RECOMPUTE = {"none": {},  # Megatron's own recomputation on top
                      "layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                      "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}


def _starve(model, expert):
    """Route no token to ``expert`` in every MoE layer (its router logit -1e4) until undone."""
    routers = [m for m in model.modules() if hasattr(m, "gating") and hasattr(m, "routing")]
    assert routers, "no MoE router in the model"
    for router in routers:
        gating = type(router).gating.__get__(router)
        router.gating = lambda inp, gating=gating: gating(inp).index_fill(-1, torch.tensor([expert]), -1e4)
    return lambda: [router.__dict__.pop("gating") for router in routers]


def _random_b(model):
    """lora_B drawn at random (same in every run): dA is non-zero from the first step on."""
    from megatron_lora.core.inject import lora_modules

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _expert_fc2_sources(model):
    """{(MoE layer name, global expert index): the bit check's decision} of this rank's experts."""
    from megatron.core import parallel_state as ps

    decided = {}
    for name, experts in model.named_modules():
        if hasattr(experts, "local_experts"):
            first = ps.get_expert_model_parallel_rank() * len(experts.local_experts)
            for i, expert in enumerate(experts.local_experts):
                decided[(name, first + i)] = expert.linear_fc2.lora_input_source.checked \
                    if expert.linear_fc2.lora_input_source is not None else "no source"
    return decided


def worker_moe_empty_expert(ep, megatron_recompute):
    from megatron_lora import apply_lora, lora_parameters
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    config = tiny_gpt_config(expert_model_parallel_size=ep, **MOE, **MEGATRON_RECOMPUTE[megatron_recompute])
    base = {k: v for k, v in build_tiny_gpt(config).state_dict().items() if isinstance(v, torch.Tensor)}
    runs = {}
    for recompute in (False, True):
        model = build_tiny_gpt(config)
        model.load_state_dict(base, strict=False)
        apply_lora(model, LoRAConfig(rank=4, alpha=8, seed=99, recompute_branch_input=recompute))
        _random_b(model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert len(params) == len(lora_parameters(model))
        opt = torch.optim.AdamW(params.values(), lr=1e-2)
        steps, decided = [], None
        for step, (inputs, labels) in enumerate(G.batches(MOE_STEPS)):
            undo = _starve(model, STARVED) if step == 0 else None
            opt.zero_grad()
            loss = G._loss(model, inputs, labels)
            loss.backward()
            if undo:
                undo()
                decided = _expert_fc2_sources(model)
            steps.append((loss.item(), {k: p.grad.clone() for k, p in params.items()}))
            opt.step()
        runs[recompute] = dict(steps=steps, decided_after_empty=decided, decided=_expert_fc2_sources(model))
    return runs


@pytest.mark.parametrize("megatron_recompute", MEGATRON_RECOMPUTE)
@pytest.mark.parametrize("ep", [1, 2])
def test_an_expert_empty_on_its_first_forward_gets_exact_adapter_gradients(ep, megatron_recompute):
    results = run_distributed(worker_moe_empty_expert, ep, ep, megatron_recompute, expert_model_parallel_size=ep)
    for rank, runs in enumerate(results):
        off, on = runs[False], runs[True]
        for step, ((loss_off, grads_off), (loss_on, grads_on)) in enumerate(zip(off["steps"], on["steps"])):
            assert loss_on == loss_off, f"rank {rank} step {step}: loss {loss_on} != {loss_off}"
            bad = [k for k in grads_off if not torch.equal(grads_on[k], grads_off[k])]
            assert not bad, f"rank {rank} step {step}: adapter gradients differ: {bad}"
        # After step 0 the starved expert has had only an empty forward: undecided. Every other
        # expert was checked on real tokens, routing scale included, and recomputes from then on.
        first = on["decided_after_empty"]
        assert len(first) == 2 * 4 // ep
        assert first == {key: None if key[1] == STARVED else True for key in first}, first
        assert set(on["decided"].values()) == {True}, on["decided"]
        assert set(off["decided"].values()) == {"no source"}


def test_an_empty_first_forward_leaves_the_expert_undecided_and_the_scale_is_a_recipe_tensor():
    from megatron_lora.core.recompute import ActivationSource, mlp_activation

    class Expert(_FakeMLP):
        def forward(self, tokens, per_token_scale=None):
            z = self.linear_fc1(tokens)
            return mlp_activation(self.config, self.activation_func, z, None) * per_token_scale.unsqueeze(-1)

    expert = Expert()
    source = ActivationSource(expert, "experts.local_experts.3.linear_fc2")
    empty = expert(torch.zeros(0, 8), torch.zeros(0))
    assert source.take(empty) is None and source.checked is None  # nothing decided on no tokens
    tokens, probs = torch.randn(5, 8), torch.rand(5)
    recipe = source.take(expert(tokens, probs))
    assert source.checked is True and recipe.tensors[2] is probs
    assert torch.equal(recipe.run(recipe.fn, *recipe.tensors), expert(tokens, probs))
