"""A LoRA layer's distributed-checkpoint view: base tensors as Megatron shards them, the LoRA
factors by their declared layout (``core/layout.py``).

The inherited ``sharded_state_dict`` would save the sharded factor as if it were replicated (one TP
shard kept: docs/design.md §10, trap 3). A gated ``linear_fc1`` gets Megatron's [gate; up] factory
for ``lora_B``, exactly as its MLP does for the base weight, so TP can change (trap 5).
"""

from __future__ import annotations

from megatron_lora.core import compat

LORA_FACTORS = ("lora_A", "lora_B")


def lora_sharded_state_dict(layer, prefix="", sharded_offsets=(), metadata=None) -> dict:
    """``layer``'s sharded state dict: ``layer._base_tp_axes`` for the base, the layout for the factors."""
    axes = dict(layer._base_tp_axes)
    for factor in LORA_FACTORS:
        dim = layer.lora_layout.partition_dim(factor)
        if dim is not None:
            axes[factor] = dim
    state = layer.state_dict(prefix="", keep_vars=True)
    sharded = compat.make_sharded_tensors_for_checkpoint(
        state, prefix, axes, sharded_offsets, layer.lora_group, metadata)
    if layer.lora_layout.gated:
        key = f"{prefix}lora_B"
        sharded[key] = compat.apply_swiglu_sharded_factory(sharded[key], sharded_offsets, metadata)
    return sharded
