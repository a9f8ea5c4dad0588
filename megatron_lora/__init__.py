"""LoRA for Megatron-Core tensor/sequence/data/pipeline-parallel models.

Public API (DESIGN §6): ``LoRAConfig``, ``apply_lora``, ``LoRAColumnParallelLinear``,
``LoRARowParallelLinear``; CPU mode is ``megatron_lora.cpu.enable_cpu`` (opt-in).
"""

from megatron_lora.config import LoRAConfig
from megatron_lora.inject import (
    adapters_disabled,
    apply_lora,
    get_gpt_lora_layer_spec,
    lora_layer_spec,
    lora_modules,
    lora_parameters,
    merge_lora,
    set_adapters_enabled,
    unmerge_lora,
)
from megatron_lora.layers import LoRAColumnParallelLinear, LoRARowParallelLinear

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "apply_lora",
    "LoRAColumnParallelLinear",
    "LoRARowParallelLinear",
    "get_gpt_lora_layer_spec",
    "lora_layer_spec",
    "lora_modules",
    "lora_parameters",
    "set_adapters_enabled",
    "adapters_disabled",
    "merge_lora",
    "unmerge_lora",
]
