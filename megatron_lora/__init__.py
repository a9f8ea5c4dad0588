"""LoRA for Megatron-Core tensor/sequence/data/pipeline-parallel models.

Public API (docs/design.md §12): ``LoRAConfig``, ``apply_lora``, ``LoRAColumnParallelLinear``,
``LoRARowParallelLinear``; CPU mode is ``megatron_lora.cpu.enable_cpu`` (opt-in).

The names are resolved on first use, so ``import megatron_lora.training.pretrain_args`` (the script's
flag check, run once before any rank starts) does not pay Megatron-Core's ~6 s import.
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
    "LoRAColumnParallelLinear": "megatron_lora.core.layers",
    "LoRARowParallelLinear": "megatron_lora.core.layers",
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
