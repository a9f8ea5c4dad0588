"""``LoRAConfig.expert_adapters = "shared"``: one adapter per MoE layer and linear, used by every
routed expert of that layer (``SequentialMLP``; grouped experts refuse it).

Layout: on each rank, the local experts' ``linear_fc1`` (resp. ``linear_fc2``) LoRA layers hold
the SAME two ``Parameter`` objects, those of local expert 0. They are initialised under a name
without the expert index (``decoder.layers.L.mlp.experts.linear_fc1``), so every expert-parallel
(EP) rank draws the same A, and each factor keeps the expert layer's expert-TP (ETP) layout.
Checkpoints keep the per-expert names (``lora_init_name`` stays each expert's global name), so
each expert's keys hold the shared tensors: identical copies.

Gradient: the shared factor is replicated over EP (and expert-DP), so its gradient must be summed
over every rank that processes tokens for the layer. Per case (TP, ETP, SP):

| layout                 | what sums the gradient                                                   |
|------------------------|--------------------------------------------------------------------------|
| ETP = TP = 1           | ``allreduce = True``: DDP's dense DP group = EP x expert-DP              |
| ETP = 1 < TP, SP on    | as above, plus both factors ``sequence_parallel``: each TP rank routes   |
|                        | its own tokens, ``finalize_model_grads`` sums over TP; no TP attributes  |
|                        | (the factors are replicated over TP: grad norms count them once)         |
| ETP = TP > 1 (same     | the per-expert rules still hold within the ETP group (replicated factor: |
| group)                 | ``"partial"`` + ``sequence_parallel``, or ``"rider_only"``); both factors|
|                        | ``allreduce = True``: DDP's dense DP group = EP x expert-DP here         |
| ETP > 1, group != TP   | refused: no existing reduction sums over EP x expert-DP                  |
| ETP = 1 < TP, no SP    | refused (Megatron trains MoE at TP > 1 only with SP)                     |

DDP scales the dense gradient by ``1 / dp`` as it does the per-expert ones, so a shared layout
trains like its EP = 1 reference (tests/distributed/test_moe_shared_adapter.py).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lora.core import collectives as C
from megatron_lora.core.init import init_lora_factors
from megatron_lora.core.layers import LoRALayerMixin
from megatron_lora.core.sharded_state import LORA_FACTORS

EXPERT_LINEARS = ("linear_fc1", "linear_fc2")


def is_shared_expert_name(cfg, name: str) -> bool:
    """Whether ``name`` is a routed expert's linear whose adapter ``share`` initialises."""
    return cfg.expert_adapters == "shared" and ".local_experts." in name


def share(chunk, names: dict) -> None:
    """Make every ``SequentialMLP`` of ``chunk`` share its local experts' LoRA factors (in place).

    ``names``: ``inject.global_module_names(chunk)``. Idempotent: a layer already shared is kept.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    for experts in (m for m in chunk.modules() if isinstance(m, SequentialMLP)):
        for leaf in EXPERT_LINEARS:
            layers = [getattr(e, leaf, None) for e in experts.local_experts]
            if not layers or not all(isinstance(layer, LoRALayerMixin) for layer in layers):
                continue
            first = layers[0]
            if first.lora_init_name is not None and all(
                    getattr(layer, f) is getattr(first, f) for layer in layers for f in LORA_FACTORS):
                continue
            _check_reducible(first, names[first])
            init_lora_factors(first, f"{names[experts]}.{leaf}")
            for layer in layers:
                for factor in LORA_FACTORS:
                    setattr(layer, factor, getattr(first, factor))
                layer.lora_init_name = names[layer]
            _mark_reduction(first)


def _check_reducible(layer, name: str) -> None:
    config = layer.config
    tp, etp = config.tensor_model_parallel_size, C.group_size(layer.lora_group)
    sp = bool(getattr(config, "sequence_parallel", False))
    if etp > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if tp_group is None or dist.get_process_group_ranks(layer.lora_group) != dist.get_process_group_ranks(tp_group):
            raise ValueError(
                f"{name}: expert_adapters='shared' at expert-TP {etp} needs the expert-TP group to be "
                f"the TP group (expected expert_tensor_parallel_size == tensor_model_parallel_size, found "
                f"TP {tp}): otherwise no reduction Megatron runs sums the shared factor's gradient over "
                "the expert-parallel ranks. Set expert-TP to TP or 1, or use --lora-expert-adapters per_expert.")
    elif tp > 1 and not sp:
        raise ValueError(
            f"{name}: expert_adapters='shared' at TP {tp} with expert-TP 1 needs sequence parallelism "
            "(each TP rank then routes its own tokens and finalize_model_grads sums the shared factor "
            "over TP; found sequence_parallel=False). Turn SP on, or use --lora-expert-adapters per_expert.")


def _mark_reduction(layer) -> None:
    """The flags of the table in the module docstring, on the shared factors."""
    across_tp = C.group_size(layer.lora_group) == 1 and layer.config.tensor_model_parallel_size > 1
    for factor in LORA_FACTORS:
        param = getattr(layer, factor)
        param.allreduce = True
        if across_tp:
            param.sequence_parallel = True
            param.tensor_model_parallel = False
