"""Recompute the LoRA branch input in backward instead of saving it (``recompute_branch_input``).

A frozen base linear keeps nothing for backward (dX = dY W needs no X), but the branch's
``dA = s g^T X`` needs its input X: the norm output feeding ``linear_qkv`` / ``linear_fc1``, the
SwiGLU output feeding ``linear_fc2``. Those are extra activations the frozen model never holds
(+23% of its activation memory on a 7B-wide model, measured on one H200 before this option
existed: benchmarks/README.md). The base DOES keep what they are made
from, for its own backward: the norm keeps its input, the activation keeps the fc1 output. So the
branch saves a reference to that tensor (the same storage: no bytes) and runs the producer again
in backward, under ``no_grad``: one norm / activation pass per layer, bitwise the same input.

A source watches its producer with a forward hook and hands the consumer a ``Recipe`` only when
the consumer's input is the producer's output of this very forward:
* ``NormSource``: the consumer's input must BE the norm's output tensor (identity), and the recipe
  is the norm module's own ``forward``, so the recomputation is the same computation.
* ``ActivationSource``: the MLP's activation is a function inside Megatron's ``MLP.forward``, not
  a module, so the recipe re-implements it for the configurations Megatron has (bias-SwiGLU /
  bias-GeLU fusion, GLU, plain activation) and the first forward of each layer checks bit for bit
  that it reproduces the input it is given; where it does not, that layer saves its input as
  before, with one warning. An unfused activation with an fc1 bias keeps ``z + b``, not the fc1
  output ``z``; there the input is saved too (saving ``z`` would cost more than it saves).
  MoE experts (``SequentialMLP``) call each expert as ``expert(tokens, probs)``: ``MLP.forward``
  multiplies the activation by that per-token routing scale before ``linear_fc2``. The source
  reads the scale with a pre-hook on the MLP and makes it one of the recipe's tensors (the scaling
  multiply keeps it for its own backward: no bytes), so the recomputed fc2 input is the scaled one.
  The bit check decides only on a non-empty input: ``SequentialMLP`` runs an expert that received
  no token on 0 rows, and two empty tensors are always equal. Such an expert stays undecided (it
  keeps its empty input, 0 bytes) until its first real tokens. Each expert has its own source, so
  each decides for itself.
Anything else (no matching producer, TE layers whose norm runs inside the layer) saves the input.

Megatron's own recomputation: ``recompute_modules=["layernorm"]`` runs the norm under ``no_grad``
inside ``CheckpointWithoutOutput``, frees its output's storage after the layer's forward and
refills it (by running the norm again) before the layer's backward. A branch that keeps that
output keeps a reference to storage Megatron already frees and restores, 0 bytes; a recipe would
run the norm a second time in backward for nothing. So a norm that ran without autograd while its
consumer runs with it gives no recipe. ``recompute_granularity="full"`` reruns the whole layer's
forward with autograd in backward; the sources act in that rerun as in any forward.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_lora.core.ops import Recipe  # noqa: F401  (re-exported: the operators' half of a recipe)

logger = logging.getLogger(__name__)


class _Source:
    """A producer's last output, held until its consumer's forward takes it (one forward)."""

    def __init__(self, producer: torch.nn.Module):
        self.pending, self.producer_had_grad = None, True
        self.handle = producer.register_forward_hook(self._capture)

    def _capture(self, _module, args, output):
        self.pending = (args[0] if args else None, output)
        self.producer_had_grad = torch.is_grad_enabled()

    def take(self, x: torch.Tensor) -> Optional[Recipe]:
        pending, self.pending = self.pending, None
        if pending is None or not torch.is_grad_enabled():
            return None
        return self._recipe(x, *pending)


class NormSource(_Source):
    """Recompute a column layer's input from the input of the norm that produced it."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__(norm)
        self.norm = norm

    def _recipe(self, x, norm_input, norm_output) -> Optional[Recipe]:
        # An input that needs no gradient (layer 0's, the frozen embedding's output) is kept by
        # nobody: keeping it instead of the output would save nothing.
        if norm_output is not x or norm_input is None or not norm_input.requires_grad:
            return None
        if not self.producer_had_grad:
            return None  # Megatron's layernorm recompute owns this output: it frees and refills it
        return Recipe(self.norm.forward, (norm_input,))


def _fuses_bias(config, activation_func) -> bool:
    """Megatron's fused bias-activation paths, which keep the fc1 output itself for backward."""
    import torch.nn.functional as F

    return bool(config.bias_activation_fusion) and (
        (activation_func is F.silu and config.gated_linear_unit)
        or (activation_func is F.gelu and not config.gated_linear_unit))


def mlp_activation(config, activation_func, z: torch.Tensor, bias: Optional[torch.Tensor],
                   per_token_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Megatron ``MLP.forward``'s activation of the fc1 output ``z``, scaled per token (row) by
    ``per_token_scale`` where an MoE expert is given its tokens' routing probabilities."""
    if _fuses_bias(config, activation_func):
        fp8_store = getattr(config, "activation_func_fp8_input_store", False)
        if per_token_scale is not None:  # of the two, Megatron takes a scale only with SwiGLU
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(z, bias, per_token_scale.unsqueeze(-1), fp8_store)
        if config.gated_linear_unit:
            from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

            return bias_swiglu_impl(z, bias, fp8_store)
        from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

        return bias_gelu_impl(z, bias) if bias is not None else activation_func(z)
    if bias is not None:
        z = z + bias
    if not config.gated_linear_unit:
        out = activation_func(z)
    else:
        gate, linear = torch.chunk(z, 2, dim=-1)
        clamp = getattr(config, "activation_func_clamp_value", None)
        if clamp is not None:
            gate, linear = gate.clamp(min=None, max=clamp), linear.clamp(min=-clamp, max=clamp)
        out = config.activation_func(gate) * (linear + getattr(config, "glu_linear_offset", 0.0))
    if per_token_scale is not None:
        out = (out * per_token_scale.unsqueeze(-1)).to(out.dtype)
    return out


class ActivationSource(_Source):
    """Recompute ``linear_fc2``'s input from ``linear_fc1``'s output (kept by the activation) and
    the MLP call's per-token scale (an MoE expert's routing probabilities, kept by the scaling).

    ``checked``: None until the first non-empty forward, then whether the recipe reproduced it."""

    def __init__(self, mlp: torch.nn.Module, name: str):
        super().__init__(mlp.linear_fc1)
        self.mlp, self.name, self.checked = mlp, name, None
        self.scale = None
        self.scale_handle = mlp.register_forward_pre_hook(self._capture_scale, with_kwargs=True)

    def _capture_scale(self, _module, args, kwargs):
        # MLP.forward(hidden_states, per_token_scale=None): SequentialMLP passes it positionally.
        self.scale = args[1] if len(args) > 1 else kwargs.get("per_token_scale")

    def _capture(self, module, args, output):
        super()._capture(module, args, output)
        self.pending, self.scale = (*self.pending, self.scale), None

    def _fn(self, z, bias, scale=None):
        return mlp_activation(self.mlp.config, self.mlp.activation_func, z, bias, scale)

    def _recipe(self, x, _fc1_input, fc1_output, scale) -> Optional[Recipe]:
        z, bias = fc1_output if isinstance(fc1_output, tuple) else (fc1_output, None)
        if bias is not None and not _fuses_bias(self.mlp.config, self.mlp.activation_func):
            return None  # the activation keeps z + bias, not z: saving z would cost more than x
        if self.checked is None:
            if x.numel() == 0:
                return None  # an expert without tokens: nothing to check, nothing kept (0 bytes)
            self.checked = torch.equal(Recipe.run(self._fn, z, bias, scale), x)
            if not self.checked:
                logger.warning("recompute_branch_input: %s's input is not the activation of linear_fc1's "
                               "output as recomputed here (an MLP variant this module does not know); "
                               "that layer keeps its branch input for backward.", self.name)
        return Recipe(self._fn, (z, bias, scale)) if self.checked else None


def _attach(consumer, make_source) -> int:
    if consumer.lora_input_source is None:  # apply_lora may run twice on a model: one hook
        consumer.lora_input_source = make_source()
    return 1


def attach_sources(chunk: torch.nn.Module, names: dict) -> int:
    """Give every local LoRA ``linear_qkv`` / ``linear_fc1`` / ``linear_fc2`` of ``chunk`` its
    source (``names``: module -> global name); returns how many got one."""
    from megatron_lora.core.layers import LoRAColumnParallelLinear, LoRARowParallelLinear

    attached = 0
    for module in chunk.modules():
        for norm_name, consumer_path in (("input_layernorm", ("self_attention", "linear_qkv")),
                                         ("pre_mlp_layernorm", ("mlp", "linear_fc1"))):
            norm = getattr(module, norm_name, None)
            parent = getattr(module, consumer_path[0], None)
            consumer = getattr(parent, consumer_path[1], None)
            if isinstance(consumer, LoRAColumnParallelLinear) and isinstance(norm, torch.nn.Module):
                attached += _attach(consumer, lambda: NormSource(norm))
        fc2 = getattr(module, "linear_fc2", None)
        if isinstance(fc2, LoRARowParallelLinear) and hasattr(module, "linear_fc1") \
                and hasattr(module, "activation_func"):
            attached += _attach(fc2, lambda: ActivationSource(module, names.get(fc2, "linear_fc2")))
    return attached
