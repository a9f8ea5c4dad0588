"""The Megatron side of a conversion: a one-rank process group and the training script's model.

Conversions build the model once, at TP=1 / PP=1, in this process (CPU mode when there is no
GPU): dist checkpoints reshard on load, so what is written loads at any TP / PP, and adapters are
logical (TP=1) tensors that ``load_full_adapter`` slices for any TP.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Optional

import torch

from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.layers import is_lora_key
from megatron_lora.hf.mapping import ConversionError


@contextlib.contextmanager
def megatron_session():
    """A one-rank process group with Megatron's parallel state at TP = PP = 1 (reused if set up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if dist.is_initialized():
        if dist.get_world_size() != 1 or not parallel_state.model_parallel_is_initialized():
            raise ConversionError("conversions run in one process (they build the model at TP=1 / PP=1); "
                                  "call them outside a multi-rank job.")
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    else:
        from megatron_lora.cpu import enable_cpu

        enable_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel()
            model_parallel_cuda_manual_seed(0)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def build_stage(model_args: dict, lora: Optional[LoRAConfig] = None, dtype: str = "float32"):
    """The GPT stage pretrain_gpt_lora.py builds for these model args, at the current TP / PP,
    weights left uninitialised (they are loaded); LoRA applied when ``lora`` is given."""
    from megatron.core import parallel_state

    from megatron_lora import apply_lora
    from megatron_lora.training.loop import gpt_stage_from_args
    from megatron_lora.training.pretrain_args import args_for_model

    args = args_for_model(
        model_args, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        hidden_dropout=0.0, attention_dropout=0.0, bf16=dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False)  # one forward, no training
    model = gpt_stage_from_args(args, lora, initialize=False)
    return apply_lora(model, lora) if lora is not None else model


def base_tensors(model) -> Dict[str, torch.Tensor]:
    """The model's base parameters and buffers by state-dict name (LoRA factors left out)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not is_lora_key(k) and not k.endswith("_extra_state")}
