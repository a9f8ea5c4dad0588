"""The RNG state a checkpoint resumes, stored as tensors (never pickled)."""

from __future__ import annotations

import torch

from megatron_lora.core.checkpoint.dist_ranks import rank, world


def rng_sharded_tensors() -> dict:
    """This rank's RNG states as ShardedTensors [world, n] (tensors, so nothing is pickled)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({f"tracker.{k}": v for k, v in get_cuda_rng_tracker().get_states().items()})
    return {name: ShardedTensor.from_rank_offsets(f"rng_state.{name}", state.clone(), (0, rank(), world()),
                                                  replica_id=0, prepend_axis_num=1)
            for name, state in states.items()}


def restore_rng(loaded: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(loaded["torch"])
    if "cuda" in loaded and torch.cuda.is_available():
        torch.cuda.set_rng_state(loaded["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in loaded.items() if k.startswith("tracker.")}
    get_cuda_rng_tracker().set_states(tracker)
