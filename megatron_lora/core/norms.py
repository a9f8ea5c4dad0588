"""Torch norms built from Megatron's norm arguments, sequence-parallel capable, for local specs.

Without Apex, Megatron's local GPT spec falls back to ``WrappedTorchNorm``, which refuses
``sequence_parallel=True``. :class:`RMSNorm` / :class:`LayerNorm` are the same torch modules with
their weights marked the way Megatron's ``FusedLayerNorm`` marks them, so sequence parallelism
works on CPU too. The parameter names (``weight``, ``bias``) and so the checkpoint keys are
Megatron's. The GPT stage builder (``training/gpt.py``) and the hybrid spec (``hybrid.py``) use them.
"""

from __future__ import annotations

import dataclasses

import torch


class _MegatronNormArguments:
    """Megatron's norm constructor arguments on a torch norm, with SP-marked weights.

    Under SP each TP rank normalises its own sequence chunk, so the weight gradient is a partial
    sum; marking the weights ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce it
    over TP (Megatron marks its ``FusedLayerNorm`` the same way).
    """

    def __init__(self, config, hidden_size, eps=1e-5, **unused_megatron_kwargs):
        super().__init__(hidden_size, eps=eps, device=torch.cuda.current_device())
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


class RMSNorm(_MegatronNormArguments, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from Megatron's norm arguments, sequence-parallel capable."""


class LayerNorm(_MegatronNormArguments, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built from Megatron's norm arguments, sequence-parallel capable."""


TORCH_NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


def torch_norm(normalization: str) -> type:
    """The SP-capable torch norm class for ``config.normalization``."""
    if normalization not in TORCH_NORMS:
        raise ValueError(f"normalization must be one of {sorted(TORCH_NORMS)}, got {normalization!r}.")
    return TORCH_NORMS[normalization]


def with_torch_norms(layer_spec, normalization: str):
    """A copy of a GPT layer spec whose norms are SP-capable torch norms: the two per-layer norms
    and, where the spec has them (``qk_layernorm``), the per-head query and key norms.

    The q / k norms see whole sequences (after ``linear_qkv``) but only this TP rank's heads, so
    their weight gradients are partial sums over TP; ``finalize_model_grads`` sums the parameters
    named ``q_layernorm`` / ``k_layernorm`` over TP whenever ``config.qk_layernorm`` is set (and
    under SP the ``sequence_parallel`` mark selects the same one sum)."""
    norm = torch_norm(normalization)
    changes = dict(input_layernorm=norm, pre_mlp_layernorm=norm)
    attention = layer_spec.submodules.self_attention
    inner = getattr(attention, "submodules", None)
    if _is_norm(getattr(inner, "q_layernorm", None)):  # Megatron's WrappedTorchNorm refuses SP
        changes["self_attention"] = dataclasses.replace(attention, submodules=dataclasses.replace(
            inner, q_layernorm=norm, k_layernorm=norm))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, **changes))


def _is_norm(module) -> bool:
    """Whether a spec's q / k norm slot holds a learned norm (not identity, not the weightless L2Norm)."""
    from megatron.core.transformer.identity_op import IdentityOp

    return module is not None and module is not IdentityOp and getattr(module, "__name__", "") != "L2Norm"
