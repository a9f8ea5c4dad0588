"""Merge a LoRA layer's adapter into its local base shard and undo it exactly (``merge`` / ``unmerge``).

With DoRA (``core/dora.py``) the merged shard is ``(m / n) ⊙ (W_i + s·B·A)`` row-wise, computed in
fp32 with n summed in fp64 (``merged_shard``; a row layer all-reduces its [out] partial squares
once), and ``unmerge`` restores the kept shard just the same.

Every merge in the package, this in-place one, the ``merge`` conversion and the in-memory export
(``hf/export.py``), multiplies with ``fp32_lora_delta``, so their results agree bit for bit. The
delta of a rank's shard is local by construction (docs/design.md §1): no communication.

The unmerged shard is kept on the CPU until ``unmerge``: subtracting the delta again would round
twice, and in bf16 change the bits of several percent of the base weights per merge / unmerge
cycle, a drift that accumulates in loops that merge to sync an inference engine and unmerge to
train on.
"""

from __future__ import annotations

import torch

from megatron_lora.core import dora


@torch.no_grad()
def fp32_lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s * B @ A`` in fp32: the one formula of every merge. Scaled in place: one product-sized
    buffer, not two."""
    return (lora_B.float() @ lora_A.float()).mul_(scaling)


@torch.no_grad()
def lora_delta(layer) -> torch.Tensor:
    """``s * B @ A`` for ``layer``'s base shard, in the base weight's dtype."""
    return fp32_lora_delta(layer.lora_A, layer.lora_b_for_gemm(), layer.lora_scaling).to(layer.weight.dtype)


@torch.no_grad()
def merged_shard(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's merged shard as a new tensor in ``dtype``, computed in fp32 and cast once:
    ``W_i + s·B·A``, DoRA's rows scaled by ``m / n`` (``dora.rescale_merged``, collective for a
    row layer). What the ``merge`` conversion writes (on its fp32 model) and the export streams."""
    merged = fp32_lora_delta(layer.lora_A, layer.lora_b_for_gemm(), layer.lora_scaling).add_(layer.weight)
    if layer.lora_config.use_dora:
        dora.rescale_merged(layer, merged)
    return merged.to(dtype)


@torch.no_grad()
def merge(layer) -> None:
    """Fold the adapter into the local base shard, keeping the unmerged shard on the CPU."""
    if not layer.lora_merged:
        layer._lora_unmerged_weight = layer.weight.detach().to("cpu", copy=True)
        if layer.lora_config.use_dora:
            layer.weight.copy_(merged_shard(layer, layer.weight.dtype))
        else:
            layer.weight.add_(lora_delta(layer))
        layer.lora_merged = True


@torch.no_grad()
def unmerge(layer) -> None:
    """Undo ``merge``: the base shard gets back exactly the bits it had."""
    if layer.lora_merged:
        layer.weight.copy_(layer._lora_unmerged_weight)
        layer._lora_unmerged_weight = None
        layer.lora_merged = False
