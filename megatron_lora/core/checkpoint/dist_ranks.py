"""This process's place in the default process group, also outside ``torch.distributed`` (one rank).

Checkpoint code asks these three questions often and before Megatron's parallel state may exist.
"""

from __future__ import annotations

import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
