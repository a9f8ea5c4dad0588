"""A tiny Megatron-Core GPT for tests: builders shared by every distributed test.

The shapes are the smallest that still exercise the interesting layouts: grouped-query attention
(4 heads, 2 query groups), SwiGLU (``linear_fc1`` holds ``[gate; up]``), RMSNorm, rotary position
embeddings, untied embeddings by default, no biases, no dropout. The fused kernels need CUDA, Apex
or Transformer Engine, so all fusions are off; ``use_cpu_initialization=False`` on purpose, so
weights are created with ``device=torch.cuda.current_device()`` and ``megatron_lora.cpu`` has to
rewrite it.

Norms: the package's SP-capable ``megatron_lora.core.norms.RMSNorm`` (Megatron's ``WrappedTorchNorm``
refuses ``sequence_parallel=True`` without Apex).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_lora.training.gpt import build_gpt_stage
from tests.distributed.shapes import SEQ_LEN, TINY_GPT, VOCAB_SIZE


def tp_rank():
    """(tensor-model-parallel size, this rank's index in its TP group), from Megatron's state."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def tiny_gpt_config(tp=1, pp=1, sp=False, **overrides):
    """TransformerConfig of the tiny GPT for the given tensor/pipeline/sequence parallel layout.

    Args:
        tp: tensor-model-parallel size (must match ``parallel_state``).
        pp: pipeline-model-parallel size (must match ``parallel_state``).
        sp: sequence parallelism (needs ``tp > 1``).
        **overrides: any TransformerConfig field, applied last.
    """
    fields = dict(
        **TINY_GPT,  # 2 layers, hidden 32, ffn 64, 4 heads in 2 query groups
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


def build_tiny_gpt(config, layer_spec=None, pre_process=None, post_process=None, **kwargs):
    """The tiny GPTModel stage of this rank (``megatron_lora.training.gpt.build_gpt_stage``).

    ``layer_spec`` (a TransformerLayer ``ModuleSpec``) swaps in e.g. a LoRA spec; its norms become
    the SP-capable torch norms. ``pre_process`` / ``post_process`` default to this rank's pipeline
    stage. ``kwargs`` go to ``GPTModel`` (e.g. ``share_embeddings_and_output_weights=True`` to tie
    the embeddings; untied by default).
    """
    kwargs.setdefault("position_embedding_type", "rope")
    kwargs.setdefault("share_embeddings_and_output_weights", False)
    return build_gpt_stage(config, VOCAB_SIZE, SEQ_LEN, layer_spec=layer_spec,
                           pre_process=pre_process, post_process=post_process, **kwargs)
