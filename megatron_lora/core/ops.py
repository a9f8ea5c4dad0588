"""The two fused LoRA linear operators: base GEMM + LoRA branch + the base layer's ONE collective.

Why fused: the replicated factor's gradient needs a TP-sum of a rank-r activation (DESIGN §3).
Autograd runs the base and LoRA backward nodes separately, so only an operator that owns both
branches can put that rank-r term into the base layer's own message. Nothing has to run after
backward, so any training loop (plain PyTorch, Megatron DDP, gradient accumulation) stays correct.

Shapes use Megatron's ``[s, b, h]``; ``t`` = TP size, ``r`` = LoRA rank, ``s_`` = scaling.
Dropout: ``mask`` is a bool tensor shaped like the LoRA branch input (or None); the layer draws it
so that replicated inputs get the same mask on every TP rank (see ``layers.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_lora.core import collectives as C


def _dropped(x: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return x if mask is None else x * mask / (1.0 - p)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _add_lora_input_grad(dx, g, lora_a, scaling, mask, p):
    """``dx += s * drop'(g @ A)`` in place: no full-size temporaries when there is no dropout."""
    if mask is None:
        _flat(dx).addmm_(_flat(g), lora_a, alpha=scaling)
    else:
        dx += _dropped(torch.matmul(g, lora_a) * scaling, mask, p)


def main_grads_for(params, fuse: bool):
    """The DDP ``main_grad`` buffers of ``params`` when gradient-accumulation fusion is on, else None.

    Taken in forward, like Megatron's own linear, because a tensor unpacked from
    ``saved_tensors`` need not be the Python object that carries ``main_grad``.
    """
    if fuse and all(hasattr(p, "main_grad") for p in params):
        return tuple(params)
    return None


def deliver_factor_grads(fused_params, grads):
    """What backward returns for the LoRA factors (Megatron's gradient_accumulation_fusion contract).

    Fused (``fused_params`` from ``main_grads_for``): each gradient is added to ``main_grad``
    here, the parameter is flagged ``grad_added_to_main_grad`` and a dummy gradient is returned, so
    DDP's hook skips its own add but still fires on the backward thread (overlap_grad_reduce needs
    that). The added value is the same tensor DDP would add, so fused and unfused agree bitwise.
    No per-parameter hook is involved (LESSONS 7).
    """
    if fused_params is None:
        return grads
    out = []
    for param, grad in zip(fused_params, grads):
        param.main_grad.add_(grad)
        param.grad_added_to_main_grad = True
        dummy = torch.zeros_like if getattr(param, "zero_out_wgrad", False) else torch.empty_like
        out.append(dummy(param, memory_format=torch.contiguous_format).detach())
    return tuple(out)


def _weight_grad(needed: bool, dy: torch.Tensor, x: torch.Tensor):
    # Frozen base: no weight-gradient GEMM at all (Megatron's linear_with_frozen_weight idea).
    return _flat(dy).t().matmul(_flat(x)) if needed else None


class LoRAColumnParallelFn(torch.autograd.Function):
    """Column-parallel ``Y_i = X W_i^T + b_i + s (drop(X) A^T) B_i^T``.

    | input X                 | [s, b, h] replicated, or [s/t, b, h] under SP          |
    | W_i, b_i / A / B_i      | [o/t, h], [o/t] / [r, h] replicated / [o/t, r] sharded  |
    | forward collective      | SP: all-gather X (the base layer's own); else none      |
    | backward collective     | ONE all-reduce (SP: reduce-scatter) of [dX_i | dY_i B_i] |

    ``dA = s (sum_i dY_i B_i)^T drop(X)`` is then complete and bitwise identical on every TP rank
    (no SP); under SP each rank holds it for its sequence chunk only, so lora_A carries
    ``sequence_parallel = True`` and Megatron's ``finalize_model_grads`` sums it over TP.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, mask, p, group, mode, fuse=False):
        # mode: see collectives.reduce_with_rider; fuse: config.gradient_accumulation_fusion
        x_total = C.all_gather_first_dim(x, group) if mode == "reduce_scatter" else x
        u = torch.matmul(_dropped(x_total, mask, p), lora_a.t())  # [s, b, r]
        y = torch.matmul(x_total, weight.t())
        _flat(y).addmm_(_flat(u), lora_b.t(), alpha=scaling)  # summed before any collective
        if bias is not None:
            y += bias
        # Under SP the frozen base needs no input and dA only this rank's sequence chunk, so the
        # gathered input is kept only for a trainable base weight.
        keep_total = mode == "reduce_scatter" and ctx.needs_input_grad[1]
        ctx.save_for_backward(x, x_total if keep_total else None, weight, lora_a, lora_b, u, mask)
        ctx.scaling, ctx.p, ctx.group, ctx.mode = scaling, p, group, mode
        ctx.fused = main_grads_for((lora_a, lora_b), fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_total, weight, lora_a, lora_b, u, mask = ctx.saved_tensors
        s, mode, group = ctx.scaling, ctx.mode, ctx.group
        g = torch.matmul(dy, lora_b)  # [s, b, r]: rank i's term of dY B
        dx = torch.matmul(dy, weight)
        _add_lora_input_grad(dx, g, lora_a, s, mask, ctx.p)
        dx, g_sum = C.reduce_with_rider(dx, g, group, mode)
        if mode == "reduce_scatter" and mask is not None:  # this rank's sequence chunk
            mask = mask.narrow(0, C.group_rank(group) * x.shape[0], x.shape[0])
        d_a = s * _flat(g_sum).t().matmul(_flat(_dropped(x, mask, ctx.p)))
        d_b = s * _flat(dy).t().matmul(_flat(u))
        d_bias = _flat(dy).sum(0) if ctx.needs_input_grad[2] else None
        d_w = _weight_grad(ctx.needs_input_grad[1], dy, x if x_total is None else x_total)
        d_a, d_b = deliver_factor_grads(ctx.fused, (d_a, d_b))
        return dx, d_w, d_bias, d_a, d_b, None, None, None, None, None, None


class LoRARowParallelFn(torch.autograd.Function):
    """Row-parallel ``Y = sum_i (X_i W_i^T + s (drop(X_i) A_i^T) B^T)`` (bias added by the layer).

    | input X_i               | [s, b, h/t]                                            |
    | W_i / A_i / B           | [o, h/t] / [r, h/t] sharded / [o, r] replicated         |
    | forward collective      | ONE all-reduce (SP: reduce-scatter) of [Y_i | X_i A_i^T] |
    | backward collective     | SP: all-gather dY (the base layer's own); else none      |

    ``dB = s dY^T (sum_i drop(X_i) A_i^T)`` is then complete and bitwise identical on every TP rank
    (no SP); under SP it covers this rank's sequence chunk, so lora_B carries
    ``sequence_parallel = True`` and ``finalize_model_grads`` sums it over TP.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, mask, p, group, mode, fuse=False):
        h = torch.matmul(_dropped(x, mask, p), lora_a.t())  # [s, b, r]: rank i's term
        y = torch.matmul(x, weight.t())
        _flat(y).addmm_(_flat(h), lora_b.t(), alpha=scaling)
        # "rider_only": the base output stays partial, the expert dispatcher reduces it.
        y, h_sum = C.reduce_with_rider(y, h, group, mode)
        # A view would keep the whole reduced message alive until backward: copy the r columns.
        ctx.save_for_backward(x, weight, lora_a, lora_b, h_sum.contiguous(), mask)
        ctx.scaling, ctx.p, ctx.group, ctx.mode = scaling, p, group, mode
        ctx.fused = main_grads_for((lora_a, lora_b), fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h_sum, mask = ctx.saved_tensors
        s = ctx.scaling
        d_b = s * _flat(dy).t().matmul(_flat(h_sum))  # SP: this chunk's part
        if ctx.mode == "reduce_scatter":
            dy = C.all_gather_first_dim(dy, ctx.group)
        g = torch.matmul(dy, lora_b)  # [s, b, r]: identical on every rank
        dx = torch.matmul(dy, weight)
        _add_lora_input_grad(dx, g, lora_a, s, mask, ctx.p)
        d_a = s * _flat(g).t().matmul(_flat(_dropped(x, mask, ctx.p)))
        d_a, d_b = deliver_factor_grads(ctx.fused, (d_a, d_b))
        return dx, _weight_grad(ctx.needs_input_grad[1], dy, x), d_a, d_b, None, None, None, None, None, None
