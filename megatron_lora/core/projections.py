"""Per-projection LoRA on fused layers: one rank-r A per projection and a compact B (issue 18).

Megatron fuses projections that PEFT keeps apart: ``linear_qkv`` holds q, k and v, a gated
``linear_fc1`` holds gate and up. With ``LoRAConfig.per_projection`` such a layer of P projections
carries one rank-r A per projection, as PEFT does, so adapters import and export at rank r::

    lora_A  [P·r, in]    [A_0; ...; A_{P-1}], replicated like any column layer's A
    lora_B  [out/t, r]   row j is that row of its own projection's B: each row belongs to ONE p(j)

    ΔW[j] = s · B[j] · A_{p(j)}

The operators (``ops.py``) are unchanged: the layer hands them the block-structured dense
``B_block [out/t, P·r]`` (row j holds B[j] in columns p(j)·r … p(j)·r + r - 1, zeros elsewhere),
built in forward by a differentiable scatter. Its backward gathers exactly those columns, so the
parameter's gradient is the compact one; the off-block entries live in no parameter, gradient or
checkpoint and cannot drift away from zero. Collectives do not change; the rider (§3) and the
two B products grow from r to P·r columns, a negligible cost.

The row map p: ``linear_qkv`` rows are grouped per query group, ``[q_g (H/G·d rows); k_g (d);
v_g (d)]`` for each group g; a gated ``linear_fc1`` is ``[gate; up]``. B's rows shard as before
(whole query groups; ``[gate_i; up_i]``) and the map is sharded with them by the same layout, so
TP resharding, Megatron's SwiGLU factory and dist checkpoints need nothing new.
"""

from __future__ import annotations

from typing import Optional

import torch


def logical_row_projections(config, output_size: int, qkv: bool, gated: bool) -> Optional[torch.Tensor]:
    """p(j) for every logical (TP=1) row of a fused layer, int64 ``[out]``; None for one projection."""
    if qkv:
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels
        if heads % groups or output_size != (heads + 2 * groups) * head_dim:
            raise ValueError(
                f"per-projection LoRA expects linear_qkv rows of q, k and v only: (heads {heads} + 2 x "
                f"query groups {groups}) x kv_channels {head_dim} = {(heads + 2 * groups) * head_dim}, but "
                f"the layer has {output_size} (e.g. attention_output_gate adds gate rows). Drop "
                "per_projection (--lora-per-projection) for this model.")
        group = [0] * (heads // groups * head_dim) + [1] * head_dim + [2] * head_dim
        return torch.tensor(group).repeat(groups)
    if gated:
        return torch.arange(2).repeat_interleave(output_size // 2)
    return None


def column_index(row_projection: torch.Tensor, rank: int) -> torch.Tensor:
    """``[rows, r]`` int64: the columns of ``B_block`` that row j's r entries go to (``row_projection[j]``
    is the projection row j feeds)."""
    return row_projection.unsqueeze(1) * rank + torch.arange(rank, device=row_projection.device)


def block_structured_b(lora_b: torch.Tensor, columns: torch.Tensor, projections: int) -> torch.Tensor:
    """The block-structured ``[rows, P·r]`` B of a compact ``[rows, r]`` one (differentiable)."""
    dense = lora_b.new_zeros(lora_b.shape[0], projections * lora_b.shape[1])
    return dense.scatter(1, columns, lora_b)
