"""Building a Megatron-Core ``GPTModel`` stage, with or without LoRA layers, on CPU or GPU.

One builder for the training script, the converters, the tests and the Megatron-LM wrapper, so
every one of them gets the same module tree (and so the same checkpoint keys):

* Megatron's local GPT layer spec (``get_gpt_layer_local_spec``), rewritten by
  ``lora_layer_spec`` when a ``LoRAConfig`` is given;
* the SP-capable torch norms of ``core/norms.py`` for the two per-layer norms, the per-head q / k
  norms (``qk_layernorm``) and the final norm;
* or, with ``transformer_impl="transformer_engine"`` (CUDA), Megatron's TE spec with the LoRA TE
  layers of ``core/te_layers.py``.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state

from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.norms import torch_norm, with_torch_norms


def gpt_layer_spec(normalization: str = "RMSNorm", lora_config: Optional[LoRAConfig] = None,
                   qk_layernorm: bool = False, transformer_impl: str = "local",
                   num_experts: Optional[int] = None, moe_grouped_gemm: bool = False):
    """Megatron's GPT layer spec and, given a config, LoRA layers.

    ``num_experts``: a mixture-of-experts MLP (Megatron's ``MoELayer``: router, token dispatcher,
    ``SequentialMLP`` experts, or grouped experts with ``moe_grouped_gemm``).

    "local": the local spec with SP-capable torch norms; "transformer_engine": the
    TE spec (norms fused into ``linear_qkv`` / ``linear_fc1``; CUDA + TE). Both give the same
    dist-checkpoint keys (Megatron maps the local norms onto the TE names), so base checkpoints
    and adapters move between them.
    """
    from megatron_lora.core.inject import lora_layer_spec, megatron_gpt_layer_spec

    moe = dict(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm) if num_experts else {}
    if transformer_impl == "local":
        spec = with_torch_norms(megatron_gpt_layer_spec(
            "local", normalization=normalization, qk_layernorm=qk_layernorm, **moe), normalization)
    else:
        spec = megatron_gpt_layer_spec(transformer_impl, qk_layernorm=qk_layernorm, **moe)
    return lora_layer_spec(spec, lora_config) if lora_config is not None else spec


def gpt_block_spec(config, layer_spec, transformer_impl: str = "local", vp_stage: Optional[int] = None):
    """The transformer block of this pipeline stage (of its virtual stage ``vp_stage``): its share
    of layers, then the final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    final_norm = torch_norm(config.normalization)
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=final_norm)


def build_gpt_stage(config, vocab_size: int, max_sequence_length: int,
                    lora_config: Optional[LoRAConfig] = None, layer_spec=None,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    transformer_impl: str = "local", **gpt_kwargs):
    """This rank's ``GPTModel`` stage (embedding on the first stage, output layer on the last).

    ``layer_spec`` (a GPT layer spec; a local spec's norms become SP-capable torch norms) defaults to
    :func:`gpt_layer_spec` for ``config.normalization`` and ``transformer_impl``;
    ``lora_config`` puts LoRA layers into it
    (call ``apply_lora(model, cfg)`` afterwards to initialise them).
    ``gpt_kwargs`` go to ``GPTModel`` (e.g. ``position_embedding_type``,
    ``share_embeddings_and_output_weights``).
    """
    from megatron.core.models.gpt import GPTModel

    if layer_spec is None:
        layer_spec = gpt_layer_spec(config.normalization, lora_config, qk_layernorm=config.qk_layernorm,
                                    transformer_impl=transformer_impl, num_experts=config.num_moe_experts,
                                    moe_grouped_gemm=config.moe_grouped_gemm)
    else:
        if transformer_impl == "local":  # a TE spec's norms are fused into its linears
            layer_spec = with_torch_norms(layer_spec, config.normalization)
        if lora_config is not None:
            from megatron_lora.core.inject import lora_layer_spec

            layer_spec = lora_layer_spec(layer_spec, lora_config)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    block = gpt_block_spec(config, layer_spec, transformer_impl, gpt_kwargs.get("vp_stage"))
    return GPTModel(config=config, transformer_layer_spec=block,
                    vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                    pre_process=pre_process, post_process=post_process, **gpt_kwargs)
