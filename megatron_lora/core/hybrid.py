"""Megatron-Core's ``HybridModel`` (megatron-core >= 0.19) with LoRA, built without Transformer Engine.

A HybridModel stacks single-purpose layers from a pattern string: ``*`` attention, ``-`` MLP,
``M`` Mamba, ``E`` MoE, ... (``|`` separates pipeline stages). Megatron's own stack spec
(``hybrid_layer_specs.hybrid_stack_spec``) is Transformer Engine throughout, and its HybridStack
always builds a TE final norm. This module gives the local spec of the layer kinds that run
anywhere, attention and MLP layers, made of the very modules of Megatron's local GPT layer:

    attention layer "*"  input_layernorm -> SelfAttention (linear_qkv, core attention, linear_proj)
    MLP layer       "-"  pre_mlp_layernorm -> MLP (linear_fc1, linear_fc2)

so LoRA (``lora_layer_spec`` / ``apply_lora``), adapter checkpoints and the Hugging Face mapping
apply unchanged. A GPT layer ``i`` is the hybrid layers ``2i`` ("*") and ``2i + 1`` ("-") of
the pattern ``"*-" * num_layers``, with the same modules and so the same numbers
(``gpt_key_of_hybrid`` maps the names; full adapters of such a model are written and read in
GPT names, so they load into GPT models and convert to PEFT unchanged). Mamba layers are not built here: Megatron's MambaMixer
needs the mamba-ssm and causal-conv1d CUDA kernels, which have no CPU build, and its ``in_proj``
packs z / x / B / C / dt per TP shard, a layout that LoRA's ``lora_B`` would need declared like
SwiGLU's ``[gate; up]`` before it could be resharded.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_lora.core import compat
from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.norms import torch_norm, with_torch_norms
from megatron_lora.core.inject import lora_layer_spec, megatron_gpt_layer_spec

BUILDABLE_SYMBOLS = "*-"  # attention, MLP: the layer kinds this module builds


@functools.lru_cache(maxsize=None)
def _local_hybrid_stack():
    """HybridStack with an SP-capable torch final norm instead of the TE norm Megatron's builds
    (a class made on first use: HybridStack exists only from megatron-core 0.19)."""
    hybrid = compat.hybrid_model_api()

    class LocalHybridStack(hybrid.HybridStack):
        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = torch_norm(config.normalization)(
                    config, config.hidden_size, eps=config.layernorm_epsilon)

    return LocalHybridStack


def hybrid_stack_spec(normalization: str = "RMSNorm", lora_config: Optional[LoRAConfig] = None,
                      qk_layernorm: bool = False):
    """The HybridStack spec of attention ("*") and MLP ("-") layers from Megatron's local GPT
    layer, with SP-capable torch norms, and LoRA layers on ``lora_config.target_modules``."""
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    hybrid = compat.hybrid_model_api()
    gpt = with_torch_norms(megatron_gpt_layer_spec("local", normalization=normalization,
                                                   qk_layernorm=qk_layernorm), normalization).submodules
    # Each layer keeps its half of the GPT layer; the norm-name map (local -> TE keys) is the GPT one.
    attention = dataclasses.replace(gpt, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    mlp = dataclasses.replace(gpt, input_layernorm=IdentityOp, self_attention=IdentityOp,
                              self_attn_bda=IdentityFuncOp)
    spec = ModuleSpec(module=_local_hybrid_stack(), submodules=hybrid.HybridStackSubmodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
        mlp_layer=ModuleSpec(module=hybrid.MLPLayer, submodules=mlp)))
    return lora_layer_spec(spec, lora_config) if lora_config is not None else spec


def check_pattern(pattern: str) -> None:
    """Refuse layer kinds this module cannot build, naming them, before anything is built."""
    main = pattern.split("/", 1)[0]
    other = sorted(set(main) - set(BUILDABLE_SYMBOLS) - {"|"})
    if other or "/" in pattern:
        raise ValueError(
            f"hybrid layer pattern {pattern!r}: megatron_lora builds attention ('*') and MLP ('-') "
            f"layers without Transformer Engine; found {other or 'multi-token prediction (/)'}. "
            "Mamba ('M') needs the mamba-ssm CUDA kernels; use Megatron's TE hybrid spec and "
            "apply_lora on a GPU for the other kinds.")


def build_hybrid_stage(config, vocab_size: int, max_sequence_length: int, layer_pattern: str,
                       lora_config: Optional[LoRAConfig] = None, pre_process: Optional[bool] = None,
                       post_process: Optional[bool] = None, **hybrid_kwargs):
    """This rank's ``HybridModel`` stage of attention and MLP layers (``layer_pattern`` such as
    ``"*-*-"``); ``lora_config`` puts LoRA layers into it (then call ``apply_lora(model, cfg)``).
    ``hybrid_kwargs`` go to ``HybridModel`` (e.g. ``position_embedding_type``,
    ``share_embeddings_and_output_weights``)."""
    check_pattern(layer_pattern)
    hybrid = compat.hybrid_model_api()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return hybrid.HybridModel(
        config=config, hybrid_stack_spec=hybrid_stack_spec(config.normalization, lora_config),
        vocab_size=vocab_size, max_sequence_length=max_sequence_length, hybrid_layer_pattern=layer_pattern,
        pre_process=pre_process, post_process=post_process, **hybrid_kwargs)


_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_ATTENTION_PARTS = ("input_layernorm", "self_attention", "self_attn_bda")


def _map_key(key: str, final_from: str, final_to: str, layer_index) -> str:
    if key.startswith(final_from):
        return final_to + key[len(final_from):]
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    index, rest = int(match.group(2)), match.group(3)
    return f"{match.group(1)}{layer_index(index, rest[1:].startswith(_ATTENTION_PARTS), key)}{rest}"


def _gpt_index(index: int, is_attention: bool, key: str) -> int:
    if is_attention != (index % 2 == 0):
        raise ValueError(f"{key}: not a layer of the pattern '*-' * L (attention at even indices).")
    return index // 2


def gpt_key_of_hybrid(key: str) -> str:
    """The GPTModel name of a HybridModel parameter or adapter tensor of pattern ``"*-" * L``:
    hybrid layers ``2i`` and ``2i + 1`` are GPT layer ``i``; the final norm is GPT's
    ``final_layernorm``. The Hugging Face mapping and PEFT export speak GPT names."""
    return _map_key(key, "decoder.final_norm.", "decoder.final_layernorm.", _gpt_index)


def is_gpt_like(model) -> bool:
    """True for a HybridModel (or its chunks) of pattern ``"*-" * L``, pipeline cuts aside."""
    from megatron_lora.core.inject import model_chunks

    patterns = {getattr(getattr(chunk, "module", chunk), "hybrid_layer_pattern", None)
                for chunk in model_chunks(model)}
    if len(patterns) != 1 or None in patterns:
        return False
    main = patterns.pop().replace("|", "")
    return len(main) > 0 and main == "*-" * (len(main) // 2)


def hybrid_key_of_gpt(key: str) -> str:
    """Inverse of :func:`gpt_key_of_hybrid`."""
    return _map_key(key, "decoder.final_layernorm.", "decoder.final_norm.",
                    lambda index, is_attention, _: 2 * index + (0 if is_attention else 1))


def _global_parameters(model) -> dict:
    from megatron_lora.core.inject import global_module_names, model_chunks

    return {f"{name}.{p_name}": p for chunk in model_chunks(model)
            for module, name in global_module_names(chunk).items()
            for p_name, p in module.named_parameters(recurse=False)}


@torch.no_grad()
def copy_gpt_weights(hybrid_model, gpt_model) -> None:
    """Copy every parameter of a GPTModel stage into the HybridModel stage of pattern ``"*-" * L``
    that holds the same layers at the same TP layout: how a GPT checkpoint (e.g. one written by
    ``scripts/convert_checkpoint.py hf-to-megatron``) reaches a HybridModel. Local: each rank
    copies its own shards; LoRA factors are copied too when both models have them."""
    if not is_gpt_like(hybrid_model):
        raise ValueError("copy_gpt_weights needs a HybridModel of pattern '*-' * num_layers.")
    source = _global_parameters(gpt_model)
    for name, param in _global_parameters(hybrid_model).items():
        gpt_name = gpt_key_of_hybrid(name)
        if gpt_name not in source:
            raise ValueError(f"{name}: the GPT stage has no {gpt_name} on this rank; build both models "
                             "with the same TP size and the same layers per pipeline stage.")
        if source[gpt_name].shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(param.shape)}, the GPT stage's {gpt_name} has "
                             f"{tuple(source[gpt_name].shape)}; build both from the same config.")
        param.copy_(source[gpt_name])
