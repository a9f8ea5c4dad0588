"""DoRA: a trainable magnitude per output feature on top of the LoRA branch (docs/design.md §18).

Weight-decomposed LoRA (Liu et al. 2024, "DoRA"; PEFT's ``use_dora``), the norm detached as the
paper proposes to cut its training overhead::

    W' = W + s·B·A          n = ‖W'‖ per output feature (over the input dim), DETACHED
    y  = (m / n) ⊙ (X Wᵀ + s·drop(X) Aᵀ Bᵀ) + bias          m: [out], trainable, init ‖W‖

The LoRA operators (``ops.py``) compute ``Z = X Wᵀ + s·drop(X) Aᵀ Bᵀ`` unchanged; ``scale`` multiplies
it by ``m / n`` and adds the bias (outside the scale, as PEFT). Where n comes from under TP:

| layer  | W shard          | m                         | n                                                     |
|--------|------------------|---------------------------|-------------------------------------------------------|
| column | whole rows i     | rows i, sharded on dim 0  | local: ‖W_i + s·B_i·A‖, no communication             |
| row    | columns i        | replicated [out]          | Σ_i ‖W_i + s·B·A_i‖² rides in the base layer's ONE    |
|        |                  |                           | reduction (``collectives.reduce_with_rider(tail=)``) |

Under SP the row layer's reduce-scatter carries t copies of the [out] partial sums, one in each
rank's chunk, so every rank receives the whole sum; ``dm = Σ_tokens dY ⊙ Z / n`` is then a
sequence-chunk partial sum, and m is marked ``sequence_parallel`` like the replicated LoRA factor
(``finalize_model_grads`` sums it). Without SP it is complete and bitwise equal on every TP rank.

n is computed in fp32 from the parameters at every forward (A and B change every step); in a
row layer the partial sums travel in the message's dtype (exact in fp32; bf16 messages give n
bf16 precision, as PEFT's bf16 norm has). Refused (``check_supported``): a row layer whose
reduction runs outside it (expert-TP > 1: the token dispatcher reduces), grouped experts and the
router (their own classes refuse), a layer without its own weight.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core.ops import deliver_factor_grads, main_grads_for
from megatron_lora.core.torch_kernels import flat


def is_row(layer) -> bool:
    """A row layer holds a slice of every row (A sharded on dim 1): its norm needs a TP sum."""
    return layer.lora_layout.a_dim is not None


@torch.no_grad()
def weight_norm_sq(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B·A‖²`` per row of this shard, fp32 ``[rows]`` (a row layer's partial sum over its columns)."""
    adapted = torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scaling)
    return adapted.square_().sum(dim=1)


def local_norm_sq(layer, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight_norm_sq`` of ``layer``'s shard with its current factors (``weight``: a weight passed
    to the forward instead of the layer's own)."""
    weight = layer.weight if weight is None else weight
    return weight_norm_sq(weight, layer.lora_A, layer.lora_b_for_gemm(), layer.lora_scaling)


class MagnitudeScale(torch.autograd.Function):
    """``y = (m / n) ⊙ Z (+ bias)`` over the last dim; n detached (a constant in backward).

    Backward: ``dZ = (m / n) ⊙ dY``, ``dm = Σ_tokens dY ⊙ Z / n`` (fp32 sum, in m's dtype), and the
    bias gradient when it is trained. Saves Z (one output-sized activation) and the fp32 scale.
    With gradient-accumulation fusion dm goes to ``main_grad`` as the factors' gradients do
    (``ops.deliver_factor_grads``). Call with ``scale``.
    """

    @staticmethod
    def forward(ctx, z, magnitude, norm, bias, grad_accum_fusion: bool):
        scale_ = magnitude.detach().float() / norm
        y = z * scale_.to(z.dtype)
        if bias is not None:
            y += bias
        ctx.save_for_backward(z, scale_, norm)
        ctx.magnitude_dtype = magnitude.dtype
        ctx.main_grad_params = main_grads_for((magnitude,), grad_accum_fusion)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, scale_, norm = ctx.saved_tensors
        d_z = dy * scale_.to(dy.dtype)
        d_m = d_bias = None
        if ctx.needs_input_grad[1]:
            d_m = (flat(dy) * flat(z)).sum(0, dtype=torch.float32).div_(norm).to(ctx.magnitude_dtype)
            [d_m] = deliver_factor_grads(ctx.main_grad_params, [d_m])
        if ctx.needs_input_grad[3]:
            d_bias = flat(dy).sum(0)
        # One gradient per forward input: z, magnitude, norm, bias, grad_accum_fusion.
        return d_z, d_m, None, d_bias, None


def scale(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
          grad_accum_fusion: bool = False) -> torch.Tensor:
    """DoRA's output from the LoRA output ``z`` (no bias yet), the magnitude and the fp32 norm [out]."""
    return MagnitudeScale.apply(z, magnitude, norm, bias, grad_accum_fusion)


def check_supported(layer, name: str) -> None:
    """Refuse DoRA where the norm's TP sum has no message of the layer's own to ride in."""
    if layer.weight is None:
        raise ValueError(f"DoRA on {name}: the layer has no weight of its own (skip_weight_param_allocation); "
                         "leave it out of --lora-target-modules or drop --lora-use-dora.")
    if is_row(layer) and layer._comm_mode() in ("partial", "rider_only"):
        raise ValueError(
            f"DoRA on {name}: a row-parallel layer whose reduction runs outside it (expert-TP > 1: the token "
            "dispatcher reduces) has no message for its weight norm's TP sum. Use --expert-tensor-parallel-size 1, "
            "or leave experts.linear_fc2 out of --lora-target-modules.")


@torch.no_grad()
def init_magnitude(layer, name: str) -> None:
    """``m = ‖W‖`` per output feature of the frozen base, in fp64 and the same at every TP size;
    a row layer sums its fp64 partial squares over its TP group (once, at init)."""
    check_supported(layer, name)
    squares = layer.weight.detach().double().square().sum(dim=1)
    if is_row(layer):
        C.all_reduce(squares, layer.lora_group)
    layer.lora_magnitude.copy_(squares.sqrt_())


_NORM_BLOCKS = 16  # merge-time norms sum a sixteenth of the rows at a time in fp64


@torch.no_grad()
def row_squares_fp64(x: torch.Tensor) -> torch.Tensor:
    """``Σ_j x_ij²`` per row in fp64, a sixteenth of the rows at a time (at most half the bytes of
    an fp32 ``x`` more, never a weight-sized fp64 copy). Each fp32 square is exact in fp64, so a
    row layer's sum of per-rank partial sums and the TP=1 sum differ by fp64 rounding only, far
    below what an fp32 result can show: the merged weight is the same at every TP size."""
    rows = max(1, -(-x.shape[0] // _NORM_BLOCKS))
    return torch.cat([block.double().square_().sum(dim=1) for block in x.split(rows)])


@torch.no_grad()
def rescale_merged(layer, merged: torch.Tensor) -> torch.Tensor:
    """DoRA's merged shard from the LoRA one: ``merged`` (this rank's fp32 ``W_i + s·B·A``) scaled
    row-wise by ``m / n`` in place, n summed in fp64 (``row_squares_fp64``). Collective over the
    layer's TP group for a row layer: one all-reduce of the fp64 [out] partial squares."""
    squares = row_squares_fp64(merged)
    if is_row(layer):
        C.all_reduce(squares, layer.lora_group)
    factor = layer.lora_magnitude.double().div_(squares.sqrt_()).float()
    return merged.mul_(factor.unsqueeze(1))
