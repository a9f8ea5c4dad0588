"""The one LoRA operator set: branch, rank-r rider and the base layer's ONE collective.

Every LoRA layer, local or on Transformer Engine, runs these three autograd functions
(docs/design.md §2-§4):

    column:  X ─► ColumnEntry ─► X_total ─► [base GEMM_i] ─► ColumnJoin ─► Y_i
             (SP: all-gather X;                ColumnJoin: + s drop(X_in) A^T B_i^T (+ bias);
              backward: ONE all-reduce /       hands dY_i B_i to ColumnEntry through the Rider)
              reduce-scatter of [dX | dY_i B_i], then dA)
    row:     X_i ─► [base GEMM_i] ─► RowJoin ─► Y
                     (+ s drop(X_i) A_i^T B^T, then ONE all-reduce / reduce-scatter of
                      [Y_i | X_i A_i^T]; SP backward: all-gather dY)

Why operators that own the branch: the replicated factor's gradient needs a TP sum of a rank-r
activation, and only an operator next to the base layer's collective can put that term into
the same message (§3). Nothing runs after backward, so any training loop stays correct.

The base GEMM: a layer that owns its weight (``layers.py``) passes ``weight`` and the Join runs
the GEMM itself, so dX is one buffer the branch term is added to in place and the frozen weight
gets no gradient GEMM; a layer on a GEMM we do not own (``external_gemm.py``, Transformer
Engine) runs it between Entry and Join and passes its output ``out``. ColumnEntry's backward
runs only after every consumer of ``X_total`` has run, so the Rider holds ColumnJoin's rank-r
term when the collective goes.

Shapes use Megatron's ``[s, b, h]``; ``t`` = TP size, ``r`` = LoRA rank, ``s`` = scaling.
Dropout: ``mask`` is a bool tensor shaped like the branch input this rank multiplies (the whole
input of a column layer, this rank's columns of a row layer's) or None, drawn by the layer from
the logical mask so that replicated inputs get the same mask on every TP rank (§6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_lora.core import collectives, kernels
from megatron_lora.core.kernels import flat
from megatron_lora.core.recompute import Recipe


@dataclass(frozen=True)
class Branch:
    """The non-tensor settings of one LoRA layer call.

    ``mode``: ``collectives.comm_mode``; ``fuse``: ``config.gradient_accumulation_fusion``;
    ``kernels``: ``LoRAConfig.branch_kernels`` (``kernels.select`` resolves it per call, the same on
    every rank of ``group``).
    """

    scaling: float
    dropout: float
    group: Any
    mode: str
    fuse: bool = False
    kernels: str = "auto"


class Rider:
    """ColumnJoin's backward terms for ColumnEntry's collective (lives for one forward):
    ``g`` = dY_i B_i, and the branch input (this rank's sequence chunk under SP) with its mask."""

    __slots__ = ("g", "branch_input", "mask")

    def __init__(self):
        self.g = self.branch_input = self.mask = None


def _dropped(x: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return x if mask is None else x * mask / (1.0 - p)


def _branch_input_grad(dx: Optional[torch.Tensor], g, lora_a, scaling, mask, p) -> torch.Tensor:
    """``dx + s * drop'(g @ A)``: in place into the base's dX when there is one and no dropout."""
    if dx is None:
        return _dropped(torch.matmul(g, lora_a) * scaling, mask, p)
    if mask is None:
        flat(dx).addmm_(flat(g), lora_a, alpha=scaling)
    else:
        dx += _dropped(torch.matmul(g, lora_a) * scaling, mask, p)
    return dx


def _keep_recipe(ctx, recipe: Optional[Recipe], trains_weight: bool) -> tuple:
    """Set ``ctx.recipe`` to the recompute function, or None when the input is kept (no recipe, or
    a trained base weight needs the input anyway); returns the recipe's tensors to save."""
    ctx.recipe = recipe.fn if recipe is not None and not trains_weight else None
    return recipe.tensors if ctx.recipe is not None else ()


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
    No per-parameter hook is involved (docs/design.md §8).
    """
    if fused_params is None:
        return grads
    out = []
    for param, grad in zip(fused_params, grads):
        param.main_grad.add_(grad)
        param.grad_added_to_main_grad = True
        dummy = torch.zeros_like if getattr(param, "zero_out_wgrad", False) else torch.empty_like
        out.append(dummy(param, memory_format=torch.contiguous_format).detach())
    return out


def _base_gemm(x: torch.Tensor, weight: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """The base output: ``x W^T`` for a weight we own, else the given output of a foreign GEMM."""
    return torch.matmul(x, weight.t()) if weight is not None else out


def _join_branch(base: torch.Tensor, owned: bool, u: torch.Tensor, lora_b, scaling) -> torch.Tensor:
    """``base + s u B^T``: in place into our own GEMM's output, out of place into a foreign one."""
    if owned:
        flat(base).addmm_(flat(u), lora_b.t(), alpha=scaling)
        return base
    return torch.addmm(flat(base), flat(u), lora_b.t(), alpha=scaling).view_as(base)


class ColumnEntry(torch.autograd.Function):
    """Column layer input: SP all-gather; backward the ONE reduction of ``[dX_total | dY_i B_i]``.

    ``dA = s (sum_i dY_i B_i)^T drop(X)`` is then complete and bitwise identical on every TP rank
    (no SP); under SP each rank holds it for its sequence chunk only, so lora_A carries
    ``sequence_parallel = True`` and Megatron's ``finalize_model_grads`` sums it over TP.
    ``lora_a`` is an input only so that its gradient is returned here; ``rider`` is None when the
    branch is off (then only dX is reduced).
    """

    @staticmethod
    def forward(ctx, x, lora_a, rider: Optional[Rider], branch: Branch):
        ctx.rider, ctx.branch = rider, branch
        ctx.fused = main_grads_for((lora_a,), branch.fuse) if lora_a is not None else None
        ctx.lora_a = lora_a  # only its shape and dtype are used (the gradient's)
        if branch.mode == "reduce_scatter":
            return collectives.all_gather_first_dim(x, branch.group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx_total):
        rider, b = ctx.rider, ctx.branch
        if rider is None or rider.g is None:  # branch off, or it received no gradient
            return collectives.reduce(dx_total.contiguous(), b.group, b.mode), None, None, None
        dx, g_sum = collectives.reduce_with_rider(dx_total.contiguous(), rider.g, b.group, b.mode)
        x_in = _dropped(rider.branch_input, rider.mask, b.dropout)
        d_a = kernels.select(b.kernels, x_in, g_sum.shape[-1], b.group).up(g_sum, x_in, b.scaling, ctx.lora_a)
        [d_a] = deliver_factor_grads(ctx.fused, [d_a])
        rider.g = rider.branch_input = rider.mask = None
        return dx, d_a, None, None


class ColumnJoin(torch.autograd.Function):
    """``Y_i = base_i + s (drop(X_in) A^T) B_i^T (+ bias)``; dA is finished by ColumnEntry.

    | X_in                 | [s, b, h]: X_total, or a fused norm's output of it        |
    | W_i, bias_i / A / B_i | [o/t, h], [o/t] / [r, h] replicated / [o/t, r] sharded    |
    | base_i               | ``X_in W_i^T`` (``weight`` given) or ``out`` (foreign GEMM) |

    ``chunk``: this rank's sequence chunk of X_in under SP, the only part dA needs (the whole
    gathered input is then not kept); None otherwise. ``recipe`` (``recompute.Recipe``, frozen
    base only): recomputes that branch input (chunk or X_in) in backward instead of keeping it.
    """

    @staticmethod
    def forward(ctx, x_in, out, weight, bias, lora_a, lora_b, mask, chunk, rider: Rider, branch: Branch,
                recipe: Optional[Recipe] = None):
        b = branch
        # [s, b, r]
        u = kernels.select(b.kernels, x_in, lora_a.shape[0], b.group).down(_dropped(x_in, mask, b.dropout), lora_a)
        y = _join_branch(_base_gemm(x_in, weight, out), weight is not None, u, lora_b, b.scaling)
        if bias is not None:
            y += bias
        trains_weight = weight is not None and ctx.needs_input_grad[2]
        sources = _keep_recipe(ctx, recipe, trains_weight)
        keep_x = trains_weight or (chunk is None and ctx.recipe is None)
        keep_chunk = chunk if ctx.recipe is None else None
        ctx.save_for_backward(x_in if keep_x else None, weight, lora_a, lora_b, u, mask, keep_chunk, *sources)
        ctx.rider, ctx.branch, ctx.foreign = rider, branch, weight is None
        ctx.fused = main_grads_for((lora_b,), b.fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, weight, lora_a, lora_b, u, mask, chunk, *sources = ctx.saved_tensors
        b, rider = ctx.branch, ctx.rider
        # g: this rank's term of dY B
        g, d_b = kernels.select(b.kernels, dy, u.shape[-1], b.group).dy(dy, lora_b, u, b.scaling)
        d_in = None
        if weight is not None or ctx.needs_input_grad[0]:
            d_base = torch.matmul(dy, weight) if weight is not None else None
            d_in = _branch_input_grad(d_base, g, lora_a, b.scaling, mask, b.dropout)
        # Frozen base: no weight-gradient GEMM at all (Megatron's linear_with_frozen_weight idea).
        d_w = flat(dy).t().matmul(flat(x_in)) if ctx.needs_input_grad[2] else None
        d_bias = flat(dy).sum(0) if ctx.needs_input_grad[3] else None
        [d_b] = deliver_factor_grads(ctx.fused, [d_b])
        if ctx.recipe is not None:
            rider.branch_input = Recipe.run(ctx.recipe, *sources)
        else:
            rider.branch_input = chunk if chunk is not None else x_in
        if b.mode == "reduce_scatter" and mask is not None:  # this rank's chunk of the logical mask
            rows = rider.branch_input.shape[0]
            mask = mask.narrow(0, collectives.group_rank(b.group) * rows, rows)
        rider.g, rider.mask = g, mask
        return d_in, dy if ctx.foreign else None, d_w, d_bias, None, d_b, None, None, None, None, None


class RowJoin(torch.autograd.Function):
    """Row-parallel ``Y = sum_i (base_i + s (drop(X_i) A_i^T) B^T)`` in ONE reduction of
    ``[Y_i | X_i A_i^T]`` (bias added by the layer, after the reduction).

    | X_i                  | [s, b, h/t]                                              |
    | W_i / A_i / B        | [o, h/t] / [r, h/t] sharded / [o, r] replicated          |
    | base_i               | ``X_i W_i^T`` (``weight`` given) or ``out`` (foreign GEMM) |
    | forward collective   | ONE all-reduce (SP: reduce-scatter) of [Y_i | X_i A_i^T] |
    | backward collective  | SP: all-gather dY (the base layer's own); else none      |

    ``dB = s dY^T (sum_i drop(X_i) A_i^T)`` is then complete and bitwise identical on every TP
    rank (no SP); under SP it covers this rank's sequence chunk, so lora_B carries
    ``sequence_parallel = True`` and ``finalize_model_grads`` sums it over TP. With ``lora_a``
    None the branch is off and only the foreign GEMM's output is reduced.
    """

    @staticmethod
    def forward(ctx, x, out, weight, lora_a, lora_b, mask, branch: Branch, recipe: Optional[Recipe] = None):
        b = branch
        ctx.branch, ctx.foreign, ctx.active = branch, weight is None, lora_a is not None
        if not ctx.active:
            return collectives.reduce(out.contiguous(), b.group, b.mode) if b.mode != "none" else out.view_as(out)
        # [s, b, r]: rank i's term
        h = kernels.select(b.kernels, x, lora_a.shape[0], b.group).down(_dropped(x, mask, b.dropout), lora_a)
        y = _join_branch(_base_gemm(x, weight, out), weight is not None, h, lora_b, b.scaling)
        # "rider_only": the base output stays partial, the expert dispatcher reduces it.
        y, h_sum = collectives.reduce_with_rider(y, h, b.group, b.mode)
        sources = _keep_recipe(ctx, recipe, weight is not None and ctx.needs_input_grad[2])
        # A view would keep the whole reduced message alive until backward: copy the r columns.
        ctx.save_for_backward(x if ctx.recipe is None else None, weight, lora_a, lora_b, h_sum.contiguous(), mask,
                              *sources)
        ctx.fused = main_grads_for((lora_a, lora_b), b.fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        b = ctx.branch
        dy_total = collectives.all_gather_first_dim(dy, b.group) if b.mode == "reduce_scatter" else dy
        if not ctx.active:
            return None, dy_total, None, None, None, None, None, None
        x, weight, lora_a, lora_b, h_sum, mask, *sources = ctx.saved_tensors
        if ctx.recipe is not None:
            x = Recipe.run(ctx.recipe, *sources)
        s, k = b.scaling, kernels.select(b.kernels, dy, lora_a.shape[0], b.group)
        if b.mode == "reduce_scatter":  # dB from this rank's chunk, g from the whole sequence
            d_b = kernels.scaled_mm(flat(dy).t(), flat(h_sum), s, lora_b)
            g = torch.matmul(dy_total, lora_b)
        else:
            g, d_b = k.dy(dy, lora_b, h_sum, s)  # g: [s, b, r], identical on every rank
        d_x = None
        if weight is not None or ctx.needs_input_grad[0]:
            d_base = torch.matmul(dy_total, weight) if weight is not None else None
            d_x = _branch_input_grad(d_base, g, lora_a, s, mask, b.dropout)
        d_a = k.up(g, _dropped(x, mask, b.dropout), s, lora_a)
        d_w = flat(dy_total).t().matmul(flat(x)) if ctx.needs_input_grad[2] else None
        d_a, d_b = deliver_factor_grads(ctx.fused, [d_a, d_b])
        return d_x, dy_total if ctx.foreign else None, d_w, d_a, d_b, None, None, None
