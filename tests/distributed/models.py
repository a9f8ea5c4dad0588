"""A tiny Megatron-Core GPT for tests: builders shared by every distributed test.

The shapes are the smallest that still exercise the interesting layouts: grouped-query attention
(4 heads, 2 query groups), SwiGLU (``linear_fc1`` holds ``[gate; up]``), RMSNorm, rotary position
embeddings, untied embeddings by default, no biases, no dropout. The fused kernels need CUDA, Apex
or Transformer Engine, so all fusions are off; ``use_cpu_initialization=False`` on purpose, so
weights are created with ``device=torch.cuda.current_device()`` and ``megatron_lora.cpu`` has to
rewrite it.

Norms: without Apex, Megatron's local spec falls back to ``WrappedTorchNorm``, which refuses
``sequence_parallel=True``. The tiny model uses :class:`TorchNorm` instead (same torch modules,
weights marked ``sequence_parallel`` the way Megatron's ``FusedLayerNorm`` marks them, so
``finalize_model_grads`` all-reduces their partial gradients over TP).
"""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

VOCAB_SIZE = 64
SEQ_LEN = 16


def tiny_gpt_config(tp=1, pp=1, sp=False, **overrides):
    """TransformerConfig of the tiny GPT for the given tensor/pipeline/sequence parallel layout.

    Args:
        tp: tensor-model-parallel size (must match ``parallel_state``).
        pp: pipeline-model-parallel size (must match ``parallel_state``).
        sp: sequence parallelism (needs ``tp > 1``).
        **overrides: any TransformerConfig field, applied last.
    """
    fields = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,  # dtype of the p2p buffers; Megatron requires it for pp > 1
        # apply_rope_fusion (needs TE), gradient_accumulation_fusion (needs Apex's CUDA extension)
        # and persist_layer_norm (refused by WrappedTorchNorm) fail on CPU. The other fusions run
        # (Megatron's jit_fuser is torch.compile) but stay off: plain PyTorch, nothing compiled.
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


class TorchNorm:
    """``torch.nn.RMSNorm`` / ``LayerNorm`` behind Megatron's norm constructor, SP-capable.

    Megatron's ``WrappedTorchNorm`` minus its ``sequence_parallel`` refusal: under SP each TP rank
    normalises its own sequence chunk, so the weight gradient is a partial sum; marking the weights
    ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce it over TP.
    """

    def __new__(cls, config, hidden_size, eps=1e-5, **unused_megatron_kwargs):
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[
            config.normalization
        ]
        norm = norm_cls(hidden_size, eps=eps, device=torch.cuda.current_device())
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def tiny_block_spec(config, layer_spec=None):
    """Block spec of this pipeline stage: ``layer_spec`` (default: Megatron's local GPT layer
    spec) with its two norms and the final norm replaced by :class:`TorchNorm`."""
    if layer_spec is None:
        layer_spec = get_gpt_layer_local_spec(normalization=config.normalization)
    layer_spec = dataclasses.replace(
        layer_spec,
        submodules=dataclasses.replace(
            layer_spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm
        ),
    )
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config), layer_norm=TorchNorm
    )


def build_tiny_gpt(config, layer_spec=None, pre_process=None, post_process=None, **kwargs):
    """The tiny GPTModel; ``layer_spec`` (a TransformerLayer ``ModuleSpec``) swaps in e.g. a LoRA
    spec, and gets the SP-capable norms of :func:`tiny_block_spec`.

    ``pre_process`` / ``post_process`` (embedding / output layer on this pipeline stage) default
    to this rank's ``parallel_state.is_pipeline_first_stage()`` / ``is_pipeline_last_stage()``,
    so the same call builds the right stage at any ``pp``. ``kwargs`` go to ``GPTModel`` (e.g.
    ``share_embeddings_and_output_weights=True`` to tie the embeddings; untied by default).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    kwargs.setdefault("position_embedding_type", "rope")
    kwargs.setdefault("share_embeddings_and_output_weights", False)
    return GPTModel(
        config=config,
        transformer_layer_spec=tiny_block_spec(config, layer_spec),
        vocab_size=VOCAB_SIZE,
        max_sequence_length=SEQ_LEN,
        pre_process=pre_process,
        post_process=post_process,
        **kwargs,
    )
