"""``peft-to-megatron`` and ``megatron-to-peft``: adapters between PEFT and megatron_lora.

The tensor mapping (stacked q/k/v A, block B, rank padding, alpha rule) is ``peft_adapters``;
this module reads and writes the files. Neither transformers nor peft is needed.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Optional

from megatron_lora.core.checkpoint import atomic_save
from megatron_lora.core.checkpoint.adapter import write_full_adapter
from megatron_lora.core.config import LoRAConfig
from megatron_lora.hf.mapping import ConversionError, arch_from_model_args
from megatron_lora.hf.peft_adapters import peft_from_megatron
from megatron_lora.hf.peft_experts import LAYOUTS
from megatron_lora.hf.sources import (
    PEFT_CONFIG, PEFT_WEIGHTS, Log, check_new_output, checked, read_adapter, read_base, read_json, read_peft, silent,
)
from megatron_lora.training.arguments import lora_flags


def peft_to_megatron(peft_dir: str, output: str, base: str, log: Log = silent,
                     per_projection: bool = False) -> LoRAConfig:
    """Import a PEFT adapter as a full adapter file; returns its LoRAConfig. ``per_projection``
    (``--per-projection``): for per-projection LoRA, keeping PEFT's rank r on every projection;
    otherwise distinct q/k/v (gate/up) A's are stacked into one rank (``peft_adapters``)."""
    model_args, _ = read_base(base)
    if os.path.exists(output):
        raise ConversionError(f"--output {output} already exists; choose a new path or delete it.")
    tensors, cfg = checked(*read_peft(peft_dir, arch_from_model_args(model_args, base), per_projection, base),
                           where=peft_dir)
    write_full_adapter(tensors, cfg, output, converted_from=f"peft:{os.path.abspath(peft_dir)}")
    kind = " per projection" if cfg.per_projection else ""
    log(f"wrote {output}: rank {cfg.rank}{kind}, alpha {cfg.alpha:g} on {' '.join(cfg.target_modules)}. "
        f"LoRA flags for pretrain_gpt_lora.py:\n  {shlex.join(['--lora-load', output, *lora_flags(cfg)])}")
    peft_rank = read_json(os.path.join(peft_dir, PEFT_CONFIG), "")["r"]
    if cfg.rank != peft_rank:
        if "router" in cfg.target_modules:
            instead = "--per-projection would keep r, but the router's adapter has no per-projection form"
        else:
            instead = (f"--per-projection imports it at r={peft_rank} per projection instead (its flags then "
                       "include --lora-per-projection)")
        log(f"note: the PEFT adapter has r={peft_rank}; its distinct q/k/v (gate/up) A's were stacked into "
            f"rank {cfg.rank}. {instead}.")
    return cfg


def megatron_to_peft(adapter: str, output: str, base: str, iteration: Optional[int] = None, compact: bool = True,
                     base_model_name_or_path: Optional[str] = None, log: Log = silent,
                     expert_layout: str = "fused") -> dict:
    """Export an adapter for transformers + peft; returns the adapter_config written.
    ``expert_layout`` (``--expert-layout``, MoE models): "fused" or "per_expert" (``peft_experts``)."""
    from safetensors.torch import save_file

    if expert_layout not in LAYOUTS:
        raise ConversionError(f"expert layout {expert_layout!r}: choose one of {', '.join(LAYOUTS)}.")
    model_args, hf_dir = read_base(base)
    arch = arch_from_model_args(model_args, base)
    check_new_output(output)
    tensors, cfg = read_adapter(adapter, model_args, iteration, log, base)
    peft_tensors, config = peft_from_megatron(tensors, cfg, arch, compact, base_model_name_or_path or hf_dir, adapter,
                                              expert_layout)
    os.makedirs(output, exist_ok=True)
    save_file(peft_tensors, os.path.join(output, PEFT_WEIGHTS), metadata={"format": "pt"})
    atomic_save.atomic_write_text(os.path.join(output, PEFT_CONFIG), json.dumps(config, indent=2))
    targets = config["target_modules"] + config.get("target_parameters", [])
    log(f"wrote the PEFT adapter {output}: r={config['r']}, lora_alpha={config['lora_alpha']} on {', '.join(targets)}")
    return config
