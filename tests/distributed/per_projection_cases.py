"""Rank workers of ``test_per_projection.py``: per-projection LoRA on the tiny GPT of ``gpt_cases``."""

import os

from megatron_lora.core.config import LoRAConfig
from tests.distributed import gpt_cases as G

PER_PROJECTION = LoRAConfig(rank=4, alpha=8, seed=99, per_projection=True)
STACKED = LoRAConfig(rank=4, alpha=8, seed=99)  # the same LoRA, one A per layer


def save_worker(full_state, root):
    """Train per-projection LoRA 3 steps; save it (dist checkpoint and full file); save an
    untrained one-A-per-layer adapter beside it for the mismatch checks."""
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter

    model = G.build_lora_gpt(full_state, cfg=PER_PROJECTION)
    G.plain_train(model, 3)
    save_adapter(model, os.path.join(root, "per_projection"), iteration=3)
    save_full_adapter(model, os.path.join(root, "per_projection.safetensors"))
    stacked = G.build_lora_gpt(full_state, cfg=STACKED)
    save_adapter(stacked, os.path.join(root, "stacked"), iteration=1)
    save_full_adapter(stacked, os.path.join(root, "stacked.safetensors"))
    return dict(adapter=G.local_adapter(model))


def load_worker(full_state, root):
    """Load the per-projection checkpoint at this layout; every mismatched load's message."""
    from megatron_lora.core.checkpoint.adapter import load_adapter, load_full_adapter
    from megatron_lora.core.checkpoint.common import CheckpointError

    model = G.build_lora_gpt(full_state, cfg=PER_PROJECTION)
    load_adapter(model, os.path.join(root, "per_projection"))
    errors = {}
    for label, cfg, load, source in (
            ("per-projection dist into stacked", STACKED, load_adapter, "per_projection"),
            ("per-projection full into stacked", STACKED, load_full_adapter, "per_projection.safetensors"),
            ("stacked dist into per-projection", PER_PROJECTION, load_adapter, "stacked"),
            ("stacked full into per-projection", PER_PROJECTION, load_full_adapter, "stacked.safetensors")):
        try:
            load(G.build_lora_gpt(full_state, cfg=cfg), os.path.join(root, source))
        except CheckpointError as err:
            errors[label] = str(err)
    return dict(adapter=G.local_adapter(model), errors=errors)
