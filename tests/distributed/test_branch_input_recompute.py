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
