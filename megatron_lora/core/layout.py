"""How a logical (unsharded) adapter maps onto TP shards: one declarative helper, many users.

The layout is derived from the base layer (docs/design.md §1) and then drives parameter shapes, TP
attributes, initialisation, gathering for tests and export, and slicing on load:

    ColumnParallelLinear  W: [out/t, in]   lora_A [r, in]  replicated   lora_B [out/t, r] dim 0
    RowParallelLinear     W: [out, in/t]   lora_A [r, in/t] dim 1       lora_B [out, r]  replicated

Gated MLPs (SwiGLU) store ``linear_fc1`` as ``[gate; up]`` *per TP shard*, so shard ``i`` of the
logical ``[gate; up]`` rows is ``[gate_i; up_i]``, not rows ``i*out/t:(i+1)*out/t``. A naive split
silently permutes rows when TP changes (docs/design.md §10, trap 5). ``linear_qkv`` rows are
grouped per query group (``[q_g, k_g, v_g]`` for g = 0..G-1) and TP splits whole groups, so a
contiguous split is right there as long as the group count divides by t (checked when the model
is built).

Per-projection LoRA (``LoRAConfig.per_projection``, ``core/projections.py``) gives a fused column
layer of P projections P stacked A's, ``lora_A [P*r, in]``, and keeps ``lora_B [out, r]``: B's rows
shard exactly as above, so nothing else here changes.

DoRA's magnitude ``lora_magnitude [out]`` (``core/dora.py``) has one entry per output feature, so it is
laid out like the output: sharded on dim 0 like a column layer's ``lora_B`` (gated rows included),
replicated in a row layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class AdapterLayout:
    """Partition dims of the two factors (None = replicated) and the gated-rows flag."""

    a_dim: Optional[int]
    b_dim: Optional[int]
    gated: bool = False  # dim-0 shards are [gate_i; up_i]
    projections: int = 1  # per-projection LoRA: A's stacked in lora_A (core/projections.py)

    @classmethod
    def column(cls, gated: bool = False, projections: int = 1) -> "AdapterLayout":
        return cls(a_dim=None, b_dim=0, gated=gated, projections=projections)

    @classmethod
    def row(cls) -> "AdapterLayout":
        return cls(a_dim=1, b_dim=None)

    def partition_dim(self, factor: str) -> Optional[int]:
        # The magnitude follows the output features, as lora_B's rows do.
        return {"lora_A": self.a_dim, "lora_B": self.b_dim, "lora_magnitude": self.b_dim}[factor]

    def logical_shapes(self, in_features: int, out_features: int, rank: int):
        return {"lora_A": (self.projections * rank, in_features), "lora_B": (out_features, rank),
                "lora_magnitude": (out_features,)}

    def local_shape(self, factor: str, logical: Sequence[int], world: int) -> Tuple[int, ...]:
        dim = self.partition_dim(factor)
        shape = list(logical)
        if dim is not None:
            parts = 2 * world if (self.gated and dim == 0) else world
            if shape[dim] % parts:
                raise ValueError(
                    f"{factor}: logical size {shape[dim]} on dim {dim} does not divide into "
                    f"{parts} equal parts (TP size {world}{', gated [gate; up] rows' if self.gated and dim == 0 else ''}). "
                    "Choose a TP size that divides the layer's sharded dimension."
                )
            shape[dim] //= world
        return tuple(shape)

    def shard(self, factor: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This rank's piece of a logical tensor."""
        dim = self.partition_dim(factor)
        if dim is not None and world > 1:
            self.local_shape(factor, full.shape, world)  # divisibility check, readable error
        return shard_tensor(full, dim, rank, world, gated=self.gated and dim == 0)

    def unshard(self, factor: str, shards: List[torch.Tensor]) -> torch.Tensor:
        """The logical tensor from all ranks' shards (inverse of ``shard``)."""
        dim = self.partition_dim(factor)
        return unshard_tensors(shards, dim, gated=self.gated and dim == 0)


def shard_tensor(full: torch.Tensor, dim: Optional[int], rank: int, world: int,
                 gated: bool = False) -> torch.Tensor:
    """Rank ``rank``'s shard along ``dim`` (None = replicated); ``gated``: [gate_i; up_i] rows."""
    if dim is None or world == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(world, dim)[rank], up.chunk(world, dim)[rank]], dim=dim)
    return full.chunk(world, dim=dim)[rank]


def unshard_tensors(shards: List[torch.Tensor], dim: Optional[int], gated: bool = False) -> torch.Tensor:
    """Inverse of ``shard_tensor`` over all ranks' shards, in rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)
