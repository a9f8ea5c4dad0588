"""LoRA for Megatron-Core tensor/sequence/data/pipeline-parallel models.

Public API (DESIGN §6): ``LoRAConfig``, ``apply_lora``, ``LoRAColumnParallelLinear``,
``LoRARowParallelLinear``; CPU mode is ``megatron_lora.cpu.enable_cpu`` (opt-in).

The names are resolved on first use, so ``import megatron_lora.pretrain_args`` (the script's
flag check, run once before any rank starts) does not pay Megatron-Core's ~6 s import.
"""

import importlib

__version__ = "0.1.0"

_HOME = {
    "LoRAConfig": "megatron_lora.config",
    "apply_lora": "megatron_lora.inject",
    "get_gpt_lora_layer_spec": "megatron_lora.inject",
    "lora_layer_spec": "megatron_lora.inject",
    "lora_modules": "megatron_lora.inject",
    "lora_parameters": "megatron_lora.inject",
    "set_adapters_enabled": "megatron_lora.inject",
    "adapters_disabled": "megatron_lora.inject",
    "merge_lora": "megatron_lora.inject",
    "unmerge_lora": "megatron_lora.inject",
    "LoRAColumnParallelLinear": "megatron_lora.layers",
    "LoRARowParallelLinear": "megatron_lora.layers",
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
