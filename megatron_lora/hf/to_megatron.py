"""``hf-to-megatron``: a Hugging Face Llama / Qwen2 checkpoint as a Megatron dist checkpoint.

Writes the base checkpoint (``model_args.json`` included) and ``model_flags.txt``, the
pretrain_gpt_lora.py model flags that rebuild the model; it loads at any TP / PP that divides the
sizes (checked for the requested one before anything is written).
"""

from __future__ import annotations

import os
import shlex

import torch

from megatron_lora.core.checkpoint import atomic_save
from megatron_lora.training.model_checkpoint import save_model
from megatron_lora.hf.mapping import (
    ConversionError, arch_from_hf_config, check_hf_config, check_hf_tensors, check_parallel_layout, megatron_flags,
    megatron_from_hf,
)
from megatron_lora.hf.session import base_tensors, build_stage, megatron_session
from megatron_lora.hf.sources import DTYPES, HFCheckpoint, Log, check_new_output, silent
from megatron_lora.training.pretrain_args import model_args_from_flags

FLAGS_FILE = "model_flags.txt"


def hf_to_megatron(hf_dir: str, output: str, tp: int = 1, pp: int = 1, dtype: str = "float32",
                   log: Log = silent) -> dict:
    """Convert a Hugging Face Llama / Qwen2 checkpoint; returns {"model_args", "flags"}."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir}: no such directory.")
    ckpt = HFCheckpoint(hf_dir)
    try:
        where = os.path.join(hf_dir, "config.json")
        check_hf_config(ckpt.config, where)
        arch = arch_from_hf_config(ckpt.config)
        check_parallel_layout(arch, tp, pp)
        check_hf_tensors(ckpt.shapes(), arch, hf_dir)
        flags = megatron_flags(ckpt.config, os.path.abspath(hf_dir))
        model_args = model_args_from_flags(flags)
        check_new_output(output)
        log(f"{ckpt.config['model_type']}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} "
            f"heads / {arch.num_groups} query groups, vocab {arch.vocab_size}; building the Megatron model")
        with megatron_session():
            model = build_stage(model_args, dtype=dtype)
            params, done = base_tensors(model), set()
            with torch.no_grad():
                for name, tensor in megatron_from_hf(ckpt.get, arch):
                    if tuple(params[name].shape) != tuple(tensor.shape):  # a mapping bug, not user input
                        raise RuntimeError(f"{name}: model {tuple(params[name].shape)}, "
                                           f"converted {tuple(tensor.shape)}")
                    params[name].copy_(tensor)
                    done.add(name)
                    if name.endswith("linear_fc2.weight"):
                        log(f"  layer {int(name.split('.')[2]) + 1}/{arch.num_layers} converted")
            if set(params) != done:
                raise RuntimeError(f"not converted: {sorted(set(params) - done)}")
            log(f"saving the Megatron checkpoint to {output}")
            save_model(model, output, 0, model_args)
    finally:
        ckpt.close()
    atomic_save.atomic_write_text(os.path.join(output, FLAGS_FILE), shlex.join(flags) + "\n")
    log(f"done; it loads at TP={tp} PP={pp} (or any layout that divides the sizes). Model flags for "
        f"pretrain_gpt_lora.py (also in {os.path.join(output, FLAGS_FILE)}):\n  {shlex.join(flags)}")
    return dict(model_args=model_args, flags=flags)
