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
    """A copy of a GPT layer spec whose two norms are SP-capable torch norms."""
    norm = torch_norm(normalization)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm))
