"""``hf-to-megatron``: a Hugging Face checkpoint (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) as a
Megatron dist checkpoint.

Writes the base checkpoint (``model_args.json`` included) and ``model_flags.txt``, the
pretrain_gpt_lora.py model flags that rebuild the model; it loads at any TP / PP (EP / ETP for
experts) that divides the sizes (checked for the requested one before anything is written).
Experts are read one by one as ``save_pretrained`` writes them, or fused as transformers 5 holds
them in memory (``mapping.fused_experts``).
"""

from __future__ import annotations

import os
import shlex
from typing import Optional

import torch

from megatron_lora.core.checkpoint import atomic_save
from megatron_lora.training.model_checkpoint import save_model
from megatron_lora.hf.mapping import (
    ConversionError, arch_from_hf_config, check_hf_config, check_hf_tensors, check_parallel_layout, fused_experts,
    megatron_flags, megatron_from_hf, megatron_names,
)
from megatron_lora.hf.session import base_tensors, build_stage, megatron_session
from megatron_lora.hf.sources import DTYPES, HFCheckpoint, Log, check_new_output, silent
from megatron_lora.training.pretrain_args import model_args_from_flags

FLAGS_FILE = "model_flags.txt"


def hf_to_megatron(hf_dir: str, output: str, tp: int = 1, pp: int = 1, dtype: str = "float32",
                   log: Log = silent, ep: int = 1, etp: Optional[int] = None) -> dict:
    """Convert a Hugging Face checkpoint of a supported family; returns {"model_args", "flags"}.
    ``tp`` / ``pp`` / ``ep`` / ``etp``: the layout it will load at, checked now."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir}: no such directory.")
    ckpt = HFCheckpoint(hf_dir)
    try:
        where = os.path.join(hf_dir, "config.json")
        shapes = ckpt.shapes()
        check_hf_config(ckpt.config, where, shapes)
        arch = arch_from_hf_config(ckpt.config)
        check_parallel_layout(arch, tp, pp, ep, etp)
        check_hf_tensors(shapes, arch, hf_dir)
        flags = megatron_flags(ckpt.config, os.path.abspath(hf_dir))
        model_args = model_args_from_flags(flags)
        check_new_output(output)
        experts = f", {arch.num_experts} experts top-{arch.moe_topk}" if arch.num_experts else ""
        log(f"{ckpt.config['model_type']}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} "
            f"heads / {arch.num_groups} query groups{experts}, vocab {arch.vocab_size}; building the Megatron model")
        layer_ends = _layer_ends(megatron_names(arch))
        with megatron_session():
            model = build_stage(model_args, dtype=dtype)
            params, done = base_tensors(model), set()
            with torch.no_grad():
                for name, tensor in megatron_from_hf(ckpt.get, arch, fused_experts(shapes)):
                    if tuple(params[name].shape) != tuple(tensor.shape):  # a mapping bug, not user input
                        raise RuntimeError(f"{name}: model {tuple(params[name].shape)}, "
                                           f"converted {tuple(tensor.shape)}")
                    params[name].copy_(tensor)
                    done.add(name)
                    if name in layer_ends:
                        log(f"  layer {layer_ends[name] + 1}/{arch.num_layers} converted")
            if set(params) != done:
                raise RuntimeError(f"not converted: {sorted(set(params) - done)}")
            log(f"saving the Megatron checkpoint to {output}")
            save_model(model, output, 0, model_args)
    finally:
        ckpt.close()
    atomic_save.atomic_write_text(os.path.join(output, FLAGS_FILE), shlex.join(flags) + "\n")
    layout = f"TP={tp} PP={pp}" + (f" EP={ep} ETP={etp or tp}" if arch.num_experts else "")
    log(f"done; it loads at {layout} (or any layout that divides the sizes). Model flags for "
        f"pretrain_gpt_lora.py (also in {os.path.join(output, FLAGS_FILE)}):\n  {shlex.join(flags)}")
    return dict(model_args=model_args, flags=flags)


def _layer_ends(names) -> dict:
    """{the last name of each layer: its layer index}, for the progress lines."""
    layer = lambda n: int(n.split(".")[2]) if n.startswith("decoder.layers.") else None  # noqa: E731
    return {n: layer(n) for n, after in zip(names, names[1:] + [""])
            if layer(n) is not None and layer(after) != layer(n)}
