"""A LoRA layer's distributed-checkpoint view: base tensors as Megatron shards them, the LoRA
tensors by their declared layout (``core/layout.py``).

The inherited ``sharded_state_dict`` would save the sharded factor as if it were replicated (one TP
shard kept: docs/design.md §10, trap 3). A gated ``linear_fc1`` gets Megatron's [gate; up] factory
for ``lora_B`` (and DoRA's ``lora_magnitude``, one entry per row), exactly as its MLP does for the
base weight, so TP can change (trap 5).
"""

from __future__ import annotations

from megatron_lora.core import compat

LORA_FACTORS = ("lora_A", "lora_B")
# DoRA's trainable magnitude per output feature (``LoRAConfig.use_dora``, ``core/dora.py``).
LORA_MAGNITUDE = "lora_magnitude"
# Every name a LoRA tensor's parameter / state-dict / checkpoint key may end in.
LORA_TENSORS = LORA_FACTORS + (LORA_MAGNITUDE,)


def lora_sharded_state_dict(layer, prefix="", sharded_offsets=(), metadata=None) -> dict:
    """``layer``'s sharded state dict: ``layer._base_tp_axes`` for the base, the layout for the
    adapter's tensors."""
    axes = dict(layer._base_tp_axes)
    names = layer.lora_tensor_names()
    for name in names:
        dim = layer.lora_layout.partition_dim(name)
        if dim is not None:
            axes[name] = dim
    state = layer.state_dict(prefix="", keep_vars=True)
    sharded = compat.make_sharded_tensors_for_checkpoint(
        state, prefix, axes, sharded_offsets, layer.lora_group, metadata)
    if layer.lora_layout.gated:
        for name in names:
            if layer.lora_layout.partition_dim(name) == 0:
                key = f"{prefix}{name}"
                sharded[key] = compat.apply_swiglu_sharded_factory(sharded[key], sharded_offsets, metadata)
    return sharded
