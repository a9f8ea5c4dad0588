"""Megatron's full activation recomputation replays the LoRA dropout mask exactly.

The mask comes from the default generator, which Megatron's CheckpointFunction saves and restores
around the recomputed forward; a mask drawn from anything else would make backward use a
different mask than forward and silently corrupt the gradients.
"""

import torch

from megatron_lora import LoRAConfig
from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def recompute_worker(full_state, recompute):
    cfg = LoRAConfig(rank=4, alpha=8, seed=99, dropout=0.3)
    model = G.build_lora_gpt(full_state, cfg=cfg, config_overrides=RECOMPUTE if recompute else None)
    losses = G.plain_train(model, 3)
    return losses, G.local_adapter(model)


def test_full_recompute_gives_the_same_training_as_no_recompute():
    base = G.base_state()
    plain = run_distributed(recompute_worker, 2, base, False, tp=2)
    recomputed = run_distributed(recompute_worker, 2, base, True, tp=2)
    for a, b in zip(plain, recomputed):
        assert a[0] == b[0]  # losses, bitwise
        for key, (tensor, _, _) in a[1].items():
            torch.testing.assert_close(b[1][key][0], tensor, rtol=1e-6, atol=1e-7, msg=key)


# ------------------------------------------------ with recompute_branch_input (recompute.py)
# Megatron's selective "layernorm" recompute frees the norm outputs after forward and refills them
# (one more norm run) before backward; the LoRA branch must keep that output (0 bytes) instead of
# running the norm yet again. Full recompute reruns each layer's forward, the sources act in it.

STEPS = 3
MEGATRON_RECOMPUTE = {"none": None,
                      "layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                      "full": RECOMPUTE}
LAYER_NORMS = ("input_layernorm", "pre_mlp_layernorm")


def _count_norm_runs(model):
    """Count every run of the layers' norms, forward, Megatron's refill and a recipe's alike (a
    recipe calls ``norm.forward`` directly, so the count wraps ``forward``, not ``__call__``)."""
    runs = [0]
    for name, norm in model.named_modules():
        if name.endswith(LAYER_NORMS):
            def counted(*args, _forward=norm.forward, **kwargs):
                runs[0] += 1
                return _forward(*args, **kwargs)
            norm.forward = counted
    return runs


def megatron_recompute_worker(full_state):
    results = {}
    for megatron, overrides in MEGATRON_RECOMPUTE.items():
        for branch in (False, True):
            cfg = LoRAConfig(rank=4, alpha=8, seed=99, dropout=0.1, recompute_branch_input=branch)
            model = G.build_lora_gpt(full_state, cfg=cfg, config_overrides=overrides)
            runs = _count_norm_runs(model)
            torch.manual_seed(11)
            losses = G.plain_train(model, STEPS)
            results[megatron, branch] = dict(losses=losses, adapter=G.local_adapter(model),
                                             norm_runs=runs[0] // STEPS)
    return results


def test_branch_input_recompute_with_megatron_recompute_is_exact_and_runs_no_extra_norm():
    from tests.distributed.shapes import TINY_GPT

    norms = len(LAYER_NORMS) * TINY_GPT["num_layers"]
    for rank, results in enumerate(run_distributed(megatron_recompute_worker, 2, G.base_state(), tp=2)):
        reference = results["none", False]
        for (megatron, branch), run in results.items():
            # The branch input recomputed or kept: bitwise the same training under each of
            # Megatron's modes.
            kept = results[megatron, False]
            assert run["losses"] == kept["losses"], f"rank {rank} {megatron} branch={branch}"
            for key, (tensor, _, _) in kept["adapter"].items():
                assert torch.equal(run["adapter"][key][0], tensor), f"rank {rank} {megatron} branch={branch}: {key}"
            # Megatron's own recomputation against none: losses bitwise; its layernorm checkpoint
            # moves the first step's factor gradients by an ulp (5e-9 on 3e-2, the option off as
            # on; marking the embedding output changes none of them) and three AdamW steps make
            # that 2.5e-7 on the adapter.
            assert run["losses"] == reference["losses"], f"rank {rank} {megatron} branch={branch}"
            for key, (tensor, _, _) in reference["adapter"].items():
                torch.testing.assert_close(run["adapter"][key][0], tensor, rtol=1e-5, atol=1e-6, msg=key)
        counts = {key: run["norm_runs"] for key, run in results.items()}
        assert counts == {
            ("none", False): norms,
            ("none", True): 2 * norms - 1,  # recipes rerun all but layer 0's first norm (input kept by nobody)
            ("layernorm", False): 2 * norms,  # Megatron's refill
            ("layernorm", True): 2 * norms,  # ... and no recipe on top of it
            ("full", False): 2 * norms,  # the layer's forward, run again in backward
            ("full", True): 3 * norms,  # ... and in that rerun each recipe (layer 0's input requires grad there)
        }, f"rank {rank}: {counts}"
