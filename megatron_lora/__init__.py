"""LoRA for Megatron-Core tensor/sequence/data/pipeline-parallel models.

Public API (docs/design.md §12): the names in ``__all__`` (``LoRAConfig``, ``apply_lora``, the
LoRA layers, the model helpers, adapter checkpoints, the in-memory Hugging Face exports); CPU
mode is ``megatron_lora.cpu.enable_cpu`` (opt-in). The library lives in ``megatron_lora.core``,
the training application in ``megatron_lora.training``, the Hugging Face conversion in
``megatron_lora.hf``.

The names are resolved on first use: every ``import megatron_lora.training.x`` runs this file
first, and the training script's flag check (``training.pretrain_args``, run once in the launcher
before any rank starts) would otherwise pay Megatron-Core's import (~3 s of CPU) for nothing.
"""

import importlib

__version__ = "0.1.0"

_HOME = {
    "LoRAConfig": "megatron_lora.core.config",
    "apply_lora": "megatron_lora.core.inject",
    "get_gpt_lora_layer_spec": "megatron_lora.core.inject",
    "lora_layer_spec": "megatron_lora.core.inject",
    "lora_modules": "megatron_lora.core.inject",
    "lora_parameters": "megatron_lora.core.inject",
    "set_adapters_enabled": "megatron_lora.core.inject",
    "adapters_disabled": "megatron_lora.core.inject",
    "merge_lora": "megatron_lora.core.inject",
    "unmerge_lora": "megatron_lora.core.inject",
    "lora_plus_param_groups": "megatron_lora.core.lora_plus",
    "LoRAColumnParallelLinear": "megatron_lora.core.layers",
    "LoRARowParallelLinear": "megatron_lora.core.layers",
    "save_adapter": "megatron_lora.core.checkpoint.adapter",
    "load_adapter": "megatron_lora.core.checkpoint.adapter",
    "save_full_adapter": "megatron_lora.core.checkpoint.adapter",
    "load_full_adapter": "megatron_lora.core.checkpoint.adapter",
    "export_peft": "megatron_lora.hf.export",
    "export_merged": "megatron_lora.hf.export",
    "export_merged_to": "megatron_lora.hf.export",
}

__all__ = list(_HOME)


def __getattr__(name):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_lora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
