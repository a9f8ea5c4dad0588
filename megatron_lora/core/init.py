"""TP-aware initialisation of LoRA factors (docs/design.md §5).

The logical ``lora_A`` is drawn ONCE, on the TP group's source rank, from a generator seeded by
(user seed, the module's qualified name with its GLOBAL layer number); it is then broadcast when A
is replicated (column layers) or scattered when A is sharded (row layers). Non-source ranks only
ever hold their own shard. Hence A depends on the seed and the layer only: not on TP size, PP
size, construction order or rank. ``lora_B`` starts at zero, so the adapted model starts exactly
at the base model; so does DoRA's magnitude, ``‖W‖`` of the base weight it is initialised with
(``dora.init_magnitude``: the base must be loaded before ``apply_lora``).

The kaiming bound uses the LOGICAL fan-in (``in``, not ``in/t``): computing it from a row shard
inflates A by sqrt(t) (docs/design.md §10, trap 1).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core import dora


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed (Python's ``hash`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def logical_lora_a(shape, init: str, seed: int, name: str, rank: Optional[int] = None) -> torch.Tensor:
    """The full ``[r, in]`` A in fp32 on CPU: identical on every machine and device. ``rank``: the
    LoRA rank when A stacks several (per-projection LoRA: ``[P*r, in]``), else ``shape[0]``."""
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    n_rows, fan_in = shape
    rank = rank or n_rows
    if init == "kaiming":
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT do: bound = 1 / sqrt(fan_in).
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if init == "gaussian":
        return torch.empty(shape).normal_(0.0, 1.0 / rank, generator=gen)
    raise ValueError(f"unknown LoRA init {init!r}; expected 'kaiming' or 'gaussian'")


@torch.no_grad()
def init_lora_factors(layer, name: str) -> None:
    """Fill ``layer.lora_A`` (TP-aware) and zero ``layer.lora_B``; collective over the TP group.
    A layer holding several adapters (grouped MoE experts) names and fills them itself (``init_lora``)."""
    if hasattr(layer, "init_lora"):
        layer.init_lora(name)
        return
    cfg, layout, group = layer.lora_config, layer.lora_layout, layer.lora_group
    world, rank = C.group_size(group), C.group_rank(group)
    a = layer.lora_A
    if layout.a_dim is None:
        if rank == 0:
            a.copy_(logical_lora_a(layer.lora_logical_shape("lora_A"), cfg.init, cfg.seed, name, cfg.rank))
        C.broadcast_from_group_source(a, group)
    else:
        chunks = None
        if rank == 0:
            full = logical_lora_a(layer.lora_logical_shape("lora_A"), cfg.init, cfg.seed, name, cfg.rank)
            full = full.to(device=a.device, dtype=a.dtype)
            chunks = [layout.shard("lora_A", full, r, world) for r in range(world)]
        C.scatter_from_group_source(a, chunks, group)
    layer.lora_B.zero_()
    if cfg.use_dora:  # m = ‖W‖ of the frozen base (core/dora.py); load the base before apply_lora
        dora.init_magnitude(layer, name)
    layer.lora_init_name = name
