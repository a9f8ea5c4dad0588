"""The base weights' row norms a DoRA import needs for the projections a PEFT adapter leaves out
(``peft_dora``), read from ``--base``: a Hugging Face model directory (only those projections'
tensors are read) or a Megatron checkpoint (the model is built at TP=1 and loaded, as ``merge``
does). A ``model_args.json`` holds no weights: ``reader`` returns None and the import names the
projection that needs them.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from megatron_lora.hf.mapping import Arch, MODULES
from megatron_lora.hf.peft_dora import BaseNorms, Key, row_norms
from megatron_lora.hf.sources import HFCheckpoint, read_base

_MODULE_OF_PART = {part: (module, parent, parts.index(part))  # projection -> (Megatron module, HF parent, row block)
                   for module, (parent, parts) in MODULES.items() for part in parts}


def reader(base: str, arch: Arch) -> Optional[BaseNorms]:
    """``{(layer, projection): ‖W_o‖ fp64}`` of ``base`` on demand; None when it holds no weights."""
    model_args, hf_dir = read_base(base)
    if hf_dir is not None:
        return lambda needed: _from_hf(hf_dir or ".", needed)
    if os.path.isfile(base):
        return None
    return lambda needed: _from_megatron(base, model_args, arch, needed)


def _from_hf(hf_dir: str, needed: List[Key]) -> Dict[Key, torch.Tensor]:
    ckpt = HFCheckpoint(hf_dir)
    try:
        return {(layer, part): row_norms(ckpt.get(f"model.layers.{layer}.{_MODULE_OF_PART[part][1]}.{part}.weight"))
                for layer, part in needed}
    finally:
        ckpt.close()


def _from_megatron(base: str, model_args: dict, arch: Arch, needed: List[Key]) -> Dict[Key, torch.Tensor]:
    from megatron_lora.hf.session import base_tensors, build_stage, megatron_session
    from megatron_lora.training.model_checkpoint import load_model

    with megatron_session():
        model = build_stage(model_args)
        load_model(model, base)
        weights = base_tensors(model)
        out = {}
        for layer, part in needed:
            module, _, index = _MODULE_OF_PART[part]
            fused = weights[f"decoder.layers.{layer}.{module}.weight"].detach()
            out[(layer, part)] = row_norms(arch.split(module, fused)[index])
        return out
