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
