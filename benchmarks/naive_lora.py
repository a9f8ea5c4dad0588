"""Variant (c) of ``bench_lora_tp2``: the naive LoRA on every target parallel linear of a model.

The layer itself, ``NaiveLoRA`` (the branch as its own Megatron parallel linears, with its own
collectives), lives in ``tests/distributed/naive_lora.py``: a harness test uses it as the
deliberately wrong design the collective-count oracle must flag, and the benchmark times it.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from tests.distributed.naive_lora import NaiveLoRA


def apply_naive_lora(model, rank: int, alpha: float, targets=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")):
    """Wrap every target parallel linear; freeze everything else. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, NaiveLoRA(module, rank, alpha))
    return model
