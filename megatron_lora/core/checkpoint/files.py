"""What adapter and base-model checkpoints look like on disk, readable without Megatron-Core.

The file names, the adapter descriptor, and which kind of checkpoint a directory holds: the
training script checks ``--save`` / ``--load`` with these before any rank starts, where importing
Megatron-Core would only cost time.

    adapter root:  latest_adapter_iteration.txt, iter_XXXXXXX/ (lora_adapter.json + dist checkpoint),
                   adapter.safetensors (the logical adapter the training script writes at the end)
    model root:    latest_checkpointed_iteration.txt, iter_XXXXXXX/ (model_args.json + dist checkpoint)
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_lora.core.checkpoint.errors import CheckpointError

FORMAT = "megatron_lora.adapter"
FORMAT_VERSION = 1
DESCRIPTOR_FILE = "lora_adapter.json"
# Earlier releases named the descriptor like PEFT's adapter_config.json; still read.
LEGACY_DESCRIPTOR_FILE = "adapter_config.json"
ADAPTER_TRACKER = "latest_adapter_iteration.txt"
FULL_ADAPTER_FILE = "adapter.safetensors"
MODEL_TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
MODEL_ARGS_FILE = "model_args.json"
KINDS = {ADAPTER_TRACKER: "adapter", MODEL_TRACKER: "model"}
# LoRAConfig fields that change what the saved numbers mean; dropout / init / seed only affect training.
# A run resumes only with all of them equal (training/checkpoint_dirs.py). The library loaders
# check ``expert_adapters`` by the values instead (FIELDS_CHECKED_BY_VALUE): per-expert keys hold a
# shared adapter as identical copies, so it loads into either layout (docs/moe.md).
CONFIG_FIELDS_THAT_MUST_MATCH = ("rank", "alpha", "use_rslora", "target_modules", "per_projection", "expert_adapters",
                                 "use_dora")
FIELDS_CHECKED_BY_VALUE = ("expert_adapters",)
# What a descriptor written before a field existed meant by its absence.
_FIELDS_ADDED_LATER = {"per_projection": False, "expert_adapters": "per_expert", "use_dora": False}


def saved_config_value(saved: dict, field: str):
    """A LoRAConfig field of a saved descriptor; older ones lack fields added since (their default)."""
    return saved.get(field, _FIELDS_ADDED_LATER.get(field))


def checkpoint_kind(root: str) -> Optional[str]:
    """``"adapter"`` or ``"model"`` by the tracker ``root`` holds; None without one (or no ``root``)."""
    found = [kind for tracker, kind in KINDS.items() if os.path.isfile(os.path.join(root, tracker))]
    return found[0] if len(found) == 1 else ("both" if found else None)


def descriptor_path(ckpt_dir: str) -> Optional[str]:
    """The descriptor file of an adapter dist checkpoint directory (this name or the legacy one)."""
    for name in (DESCRIPTOR_FILE, LEGACY_DESCRIPTOR_FILE):
        path = os.path.join(ckpt_dir, name)
        if os.path.exists(path):
            return path
    return None


def read_descriptor(ckpt_dir: str) -> dict:
    path = descriptor_path(ckpt_dir)
    if path is None:
        raise CheckpointError(
            f"{ckpt_dir} has no {DESCRIPTOR_FILE}: not a complete megatron_lora adapter checkpoint "
            "(an interrupted save?). Load the latest complete one with load_adapter(model, root).")
    try:
        with open(path, encoding="utf-8") as f:
            descriptor = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupted ({err}); load an earlier checkpoint.")
    if descriptor.get("format") != FORMAT or descriptor.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
            f"{descriptor.get('format')!r} version {descriptor.get('format_version')!r}.")
    return descriptor
