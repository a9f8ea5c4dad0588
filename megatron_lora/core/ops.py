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

Each call says what it is: the tensors go positionally (autograd needs them so), everything else
in one frozen ``Call`` (branch on or off, our GEMM or a foreign one, the ``Rider``, a ``Recipe``);
layers call the keyword wrappers ``column_entry`` / ``column_join`` / ``row_join``, and every
layer family reaches them through one orchestration (``layer_forward.py``).

The base GEMM: a layer that owns its weight (``layers.py``) passes ``weight`` and the Join runs
the GEMM itself, so dX is one buffer the branch term is added to in place and the frozen weight
gets no gradient GEMM; a layer on a GEMM we do not own (``external_gemm.py``, Transformer
Engine) runs it between Entry and Join and passes its output ``out``. How ColumnJoin's rank-r
term reaches ColumnEntry's collective: ``Rider`` (the one place that hand-off is described).

Shapes use Megatron's ``[s, b, h]``; ``t`` = TP size, ``r`` = LoRA rank, ``s`` = scaling.
Dropout: ``mask`` is a bool tensor shaped like the branch input this rank multiplies (the whole
input of a column layer, this rank's columns of a row layer's) or None, drawn by the layer from
the logical mask so that replicated inputs get the same mask on every TP rank (§6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch

from megatron_lora.core import collectives, kernels
from megatron_lora.core.torch_kernels import flat, scaled_mm


@dataclass(frozen=True)
class Branch:
    """The non-tensor settings of one LoRA layer call.

    ``mode``: ``collectives.comm_mode``; ``grad_accum_fusion``: ``config.gradient_accumulation_fusion``;
    ``kernel_choice``: ``LoRAConfig.branch_kernels`` (``kernels.select`` resolves it per call, the
    same on every rank of ``group``).
    """

    scaling: float
    dropout: float
    group: Any
    mode: str
    grad_accum_fusion: bool = False
    kernel_choice: str = "auto"


class Rider:
    """The one hand-off between two autograd nodes: ColumnJoin's backward -> ColumnEntry's backward.

    Why: dA needs ``sum_i dY_i B_i`` over the TP group, and the only collective that can carry
    that rank-r term is the base layer's dX reduction, which ColumnEntry issues (§3). The term
    is computed in ColumnJoin's backward, which autograd runs first: ColumnEntry's output
    ``X_total`` feeds ColumnJoin (and a foreign GEMM), so ColumnEntry's backward waits for every
    consumer. One Rider lives for one forward; the layer makes it and passes the same object to
    both operators (``Call.rider``).

    | field          | written by ColumnJoin.backward                  | read by ColumnEntry.backward |
    |----------------|-------------------------------------------------|------------------------------|
    | ``g``          | ``dY_i B_i``, [s, b, r] (None: no gradient came) | reduced with dX, then dA      |
    | ``branch_input``| the branch input dA multiplies (SP: this rank's chunk), kept or recomputed | dA |
    | ``mask``       | its dropout keep-mask (SP: this rank's chunk) or None | dA                     |

    ColumnEntry clears all three after use, so nothing outlives the backward.
    """

    __slots__ = ("g", "branch_input", "mask")

    def __init__(self):
        self.g = self.branch_input = self.mask = None


class Recipe:
    """What a LoRA operator saves instead of its branch input: ``fn(*tensors)`` recomputes it
    (``recompute.py`` makes recipes; the operators only run them)."""

    __slots__ = ("fn", "tensors")

    def __init__(self, fn: Callable[..., torch.Tensor], tensors: Tuple[Optional[torch.Tensor], ...]):
        self.fn, self.tensors = fn, tensors

    @staticmethod
    def run(fn, *tensors) -> torch.Tensor:
        with torch.no_grad():
            return fn(*tensors)


@dataclass(frozen=True)
class Call:
    """The non-tensor half of one operator call: what the call is, said by name.

    ``autograd.Function.apply`` takes its tensors positionally; everything else an operator needs
    is this one frozen object (its backward returns None for it).

    | field       | meaning                                                                        |
    |-------------|--------------------------------------------------------------------------------|
    | branch      | the layer's ``Branch`` settings                                                |
    | lora_on     | False: the branch is off; only the base output / dX is reduced (foreign GEMM) |
    | owns_gemm   | True: ``weight`` is given and the Join runs ``X W^T``; False: ``out`` is a     |
    |             | foreign GEMM's output (Transformer Engine) and dX of it is returned to it      |
    | rider       | column operators: the ``Rider`` of this forward (None when the branch is off) |
    | recipe      | recompute the branch input in backward instead of keeping it (``Recipe``)      |
    """

    branch: Branch
    lora_on: bool = True
    owns_gemm: bool = True
    rider: Optional[Rider] = None
    recipe: Optional[Recipe] = None


# What a Join keeps of its branch input for dA (``ctx.kept``): the input itself, this rank's
# SP chunk of it, or only a recipe's sources (``recompute_branch_input``).
KEEP_INPUT, KEEP_CHUNK, KEEP_RECIPE = "input", "chunk", "recipe"


class _ColumnSaved(NamedTuple):
    """ColumnJoin's saved tensors, by name (None where not kept)."""

    x_in: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    u: torch.Tensor  # drop(X_in) A^T, [s, b, r]
    mask: Optional[torch.Tensor]
    chunk: Optional[torch.Tensor]
    sources: tuple  # the recipe's tensors


class _RowSaved(NamedTuple):
    """RowJoin's saved tensors, by name (None where not kept)."""

    x: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    h_sum: torch.Tensor  # sum_i drop(X_i) A_i^T, [s, b, r] (SP: this rank's chunk)
    mask: Optional[torch.Tensor]
    sources: tuple


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


def _kept(trains_weight: bool, chunk: Optional[torch.Tensor], recipe: Optional[Recipe]) -> str:
    """What a Join keeps of its branch input for dA. A recipe is used only for a frozen base (a
    trained weight needs the input for its own gradient anyway); else the SP chunk when given."""
    if recipe is not None and not trains_weight:
        return KEEP_RECIPE
    return KEEP_CHUNK if chunk is not None else KEEP_INPUT


def main_grads_for(params, grad_accum_fusion: bool):
    """The DDP ``main_grad`` buffers of ``params`` when gradient-accumulation fusion is on, else None.

    Taken in forward, like Megatron's own linear, because a tensor unpacked from
    ``saved_tensors`` need not be the Python object that carries ``main_grad``.
    """
    if grad_accum_fusion and all(hasattr(p, "main_grad") for p in params):
        return tuple(params)
    return None


def deliver_factor_grads(main_grad_params, grads):
    """What backward returns for the LoRA factors (Megatron's gradient_accumulation_fusion contract).

    With the fusion (``main_grad_params`` from ``main_grads_for``): each gradient is added to ``main_grad``
    here, the parameter is flagged ``grad_added_to_main_grad`` and a dummy gradient is returned, so
    DDP's hook skips its own add but still fires on the backward thread (overlap_grad_reduce needs
    that). The added value is the same tensor DDP would add, so with and without the fusion
    the gradients agree bitwise.
    No per-parameter hook is involved (docs/design.md §8).
    """
    if main_grad_params is None:
        return grads
    out = []
    for param, grad in zip(main_grad_params, grads):
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
    ``lora_a`` is an input only so that its gradient is returned here (None when the branch is
    off: then only dX is reduced). Call with ``column_entry``.
    """

    @staticmethod
    def forward(ctx, x, lora_a, call: Call):
        ctx.call = call
        ctx.main_grad_params = main_grads_for((lora_a,), call.branch.grad_accum_fusion) if call.lora_on else None
        ctx.lora_a = lora_a  # only its shape and dtype are used (the gradient's)
        if call.branch.mode == "reduce_scatter":
            return collectives.all_gather_first_dim(x, call.branch.group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx_total):
        rider, b = ctx.call.rider, ctx.call.branch
        if not ctx.call.lora_on or rider.g is None:  # branch off, or it received no gradient
            return collectives.reduce(dx_total.contiguous(), b.group, b.mode), None, None
        dx, g_sum, _ = collectives.reduce_with_rider(dx_total.contiguous(), rider.g, b.group, b.mode)
        x_in = _dropped(rider.branch_input, rider.mask, b.dropout)
        d_a = kernels.select(b.kernel_choice, x_in, g_sum.shape[-1], b.group).up(g_sum, x_in, b.scaling, ctx.lora_a)
        [d_a] = deliver_factor_grads(ctx.main_grad_params, [d_a])
        rider.g = rider.branch_input = rider.mask = None
        return dx, d_a, None


class ColumnJoin(torch.autograd.Function):
    """``Y_i = base_i + s (drop(X_in) A^T) B_i^T (+ bias)``; dA is finished by ColumnEntry.

    | X_in                 | [s, b, h]: X_total, or a fused norm's output of it        |
    | W_i, bias_i / A / B_i | [o/t, h], [o/t] / [r, h] replicated / [o/t, r] sharded    |
    | base_i               | ``X_in W_i^T`` (``call.owns_gemm``) or ``out`` (foreign GEMM) |

    ``chunk``: this rank's sequence chunk of X_in under SP, the only part dA needs (the whole
    gathered input is then not kept); None otherwise. ``call.recipe`` (frozen base only):
    recomputes that branch input (chunk or X_in) in backward instead of keeping it. Backward
    hands ``dY_i B_i``, the branch input and its mask to ColumnEntry through ``call.rider``.
    Call with ``column_join``.
    """

    @staticmethod
    def forward(ctx, x_in, out, weight, bias, lora_a, lora_b, mask, chunk, call: Call):
        b = call.branch
        # [s, b, r]
        k = kernels.select(b.kernel_choice, x_in, lora_a.shape[0], b.group)
        u = k.down(_dropped(x_in, mask, b.dropout), lora_a)
        y = _join_branch(_base_gemm(x_in, weight, out), call.owns_gemm, u, lora_b, b.scaling)
        if bias is not None:
            y += bias
        trains_weight = call.owns_gemm and ctx.needs_input_grad[2]
        ctx.kept = _kept(trains_weight, chunk, call.recipe)
        sources = call.recipe.tensors if ctx.kept == KEEP_RECIPE else ()
        keep_x = trains_weight or ctx.kept == KEEP_INPUT
        keep_chunk = chunk if ctx.kept == KEEP_CHUNK else None
        ctx.save_for_backward(x_in if keep_x else None, weight, lora_a, lora_b, u, mask, keep_chunk, *sources)
        ctx.call = call
        ctx.main_grad_params = main_grads_for((lora_b,), b.grad_accum_fusion)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, weight, lora_a, lora_b, u, mask, chunk, *sources = ctx.saved_tensors
        saved = _ColumnSaved(x_in, weight, lora_a, lora_b, u, mask, chunk, tuple(sources))
        b, rider = ctx.call.branch, ctx.call.rider
        # g: this rank's term of dY B
        k = kernels.select(b.kernel_choice, dy, saved.u.shape[-1], b.group)
        g, d_b = k.dy(dy, saved.lora_b, saved.u, b.scaling)
        d_in = None
        if ctx.call.owns_gemm or ctx.needs_input_grad[0]:
            d_base = torch.matmul(dy, saved.weight) if ctx.call.owns_gemm else None
            d_in = _branch_input_grad(d_base, g, saved.lora_a, b.scaling, saved.mask, b.dropout)
        # Frozen base: no weight-gradient GEMM at all (Megatron's linear_with_frozen_weight idea).
        d_w = flat(dy).t().matmul(flat(saved.x_in)) if ctx.needs_input_grad[2] else None
        d_bias = flat(dy).sum(0) if ctx.needs_input_grad[3] else None
        [d_b] = deliver_factor_grads(ctx.main_grad_params, [d_b])
        if ctx.kept == KEEP_RECIPE:
            rider.branch_input = Recipe.run(ctx.call.recipe.fn, *saved.sources)
        else:
            rider.branch_input = saved.chunk if ctx.kept == KEEP_CHUNK else saved.x_in
        mask = saved.mask
        if b.mode == "reduce_scatter" and mask is not None:  # this rank's chunk of the logical mask
            rows = rider.branch_input.shape[0]
            mask = mask.narrow(0, collectives.group_rank(b.group) * rows, rows)
        rider.g, rider.mask = g, mask
        d_out = None if ctx.call.owns_gemm else dy
        # One gradient per forward input: x_in, out, weight, bias, lora_a, lora_b, mask, chunk, call.
        return d_in, d_out, d_w, d_bias, None, d_b, None, None, None


class RowJoin(torch.autograd.Function):
    """Row-parallel ``Y = sum_i (base_i + s (drop(X_i) A_i^T) B^T)`` in ONE reduction of
    ``[Y_i | X_i A_i^T]`` (bias added by the layer, after the reduction).

    | X_i                  | [s, b, h/t]                                              |
    | W_i / A_i / B        | [o, h/t] / [r, h/t] sharded / [o, r] replicated          |
    | base_i               | ``X_i W_i^T`` (``call.owns_gemm``) or ``out`` (foreign GEMM) |
    | forward collective   | ONE all-reduce (SP: reduce-scatter) of [Y_i | X_i A_i^T] |
    | backward collective  | SP: all-gather dY (the base layer's own); else none      |

    ``dB = s dY^T (sum_i drop(X_i) A_i^T)`` is then complete and bitwise identical on every TP
    rank (no SP); under SP it covers this rank's sequence chunk, so lora_B carries
    ``sequence_parallel = True`` and ``finalize_model_grads`` sums it over TP. With
    ``call.lora_on`` False only the foreign GEMM's output is reduced. ``norm_sq``: DoRA's [out]
    partial squared weight norms of this rank's columns, appended to the same message; forward
    then also returns their TP sum (no gradient; docs/design.md §18). Call with ``row_join``.
    """

    @staticmethod
    def forward(ctx, x, out, weight, lora_a, lora_b, mask, norm_sq, call: Call):
        b = call.branch
        ctx.call = call
        if not call.lora_on:
            return collectives.reduce(out.contiguous(), b.group, b.mode) if b.mode != "none" else out.view_as(out)
        # [s, b, r]: rank i's term
        h = kernels.select(b.kernel_choice, x, lora_a.shape[0], b.group).down(_dropped(x, mask, b.dropout), lora_a)
        y = _join_branch(_base_gemm(x, weight, out), call.owns_gemm, h, lora_b, b.scaling)
        # "rider_only" / "partial": the base output stays partial, the expert dispatcher reduces
        # it; under "partial" h_sum is this rank's term and dB a partial sum (summed per step).
        y, h_sum, norm_sq = collectives.reduce_with_rider(y, h, b.group, b.mode, tail=norm_sq)
        ctx.kept = _kept(call.owns_gemm and ctx.needs_input_grad[2], None, call.recipe)
        sources = call.recipe.tensors if ctx.kept == KEEP_RECIPE else ()
        # A view would keep the whole reduced message alive until backward: copy the r columns.
        ctx.save_for_backward(x if ctx.kept == KEEP_INPUT else None, weight, lora_a, lora_b, h_sum.contiguous(),
                              mask, *sources)
        ctx.main_grad_params = main_grads_for((lora_a, lora_b), b.grad_accum_fusion)
        if norm_sq is None:
            return y
        norm_sq = norm_sq.clone()  # a tensor of its own (at TP = 1 it is the input itself)
        ctx.mark_non_differentiable(norm_sq)
        ctx.set_materialize_grads(False)  # no zeros for the norm's absent gradient
        return y, norm_sq

    @staticmethod
    def backward(ctx, dy, *_):  # no gradient flows to the norm (DoRA's is detached)
        call, b = ctx.call, ctx.call.branch
        dy_total = collectives.all_gather_first_dim(dy, b.group) if b.mode == "reduce_scatter" else dy
        d_out = None if call.owns_gemm else dy_total
        if not call.lora_on:
            return None, d_out, None, None, None, None, None, None
        x, weight, lora_a, lora_b, h_sum, mask, *sources = ctx.saved_tensors
        saved = _RowSaved(x, weight, lora_a, lora_b, h_sum, mask, tuple(sources))
        if ctx.kept == KEEP_RECIPE:
            x = Recipe.run(call.recipe.fn, *saved.sources)
        s, k = b.scaling, kernels.select(b.kernel_choice, dy, saved.lora_a.shape[0], b.group)
        if b.mode == "reduce_scatter":  # dB from this rank's chunk, g from the whole sequence
            d_b = scaled_mm(flat(dy).t(), flat(saved.h_sum), s, saved.lora_b)
            g = torch.matmul(dy_total, saved.lora_b)
        else:
            g, d_b = k.dy(dy, saved.lora_b, saved.h_sum, s)  # g: [s, b, r], identical on every rank
        d_x = None
        if call.owns_gemm or ctx.needs_input_grad[0]:
            d_base = torch.matmul(dy_total, saved.weight) if call.owns_gemm else None
            d_x = _branch_input_grad(d_base, g, saved.lora_a, s, saved.mask, b.dropout)
        d_a = k.up(g, _dropped(x, saved.mask, b.dropout), s, saved.lora_a)
        d_w = flat(dy_total).t().matmul(flat(x)) if ctx.needs_input_grad[2] else None
        d_a, d_b = deliver_factor_grads(ctx.main_grad_params, [d_a, d_b])
        # One gradient per forward input: x, out, weight, lora_a, lora_b, mask, norm_sq, call.
        return d_x, d_out, d_w, d_a, d_b, None, None, None


def column_entry(x: torch.Tensor, lora_a: Optional[torch.Tensor], call: Call) -> torch.Tensor:
    """``X_total`` of a column layer (``ColumnEntry``); ``lora_a`` None exactly when the branch is off."""
    _check(call, lora_a, column=True)
    return ColumnEntry.apply(x, lora_a, call)


def column_join(x_in: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, call: Call, *,
                weight: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                chunk: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A column layer's output (``ColumnJoin``): ``weight`` for our own GEMM, else the foreign ``out``."""
    _check(call, lora_a, column=True, gemm=(weight, out))
    return ColumnJoin.apply(x_in, out, weight, bias, lora_a, lora_b, mask, chunk, call)


def row_join(x: torch.Tensor, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], call: Call, *,
             weight: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
             mask: Optional[torch.Tensor] = None, norm_sq: Optional[torch.Tensor] = None):
    """A row layer's reduced output, bias not added (``RowJoin``); with ``norm_sq`` (DoRA's partial
    squared norms, branch on) the pair (output, their TP sum)."""
    _check(call, lora_a, column=False, gemm=(weight, out))
    if norm_sq is not None and not call.lora_on:
        raise ValueError("row_join: norm_sq (DoRA) needs the branch on (Call.lora_on).")
    return RowJoin.apply(x, out, weight, lora_a, lora_b, mask, norm_sq, call)


def _check(call: Call, lora_a, column: bool, gemm=None) -> None:
    """The tensors a caller passes must say the same as its ``Call`` (a programming error otherwise).
    ``gemm``: a Join's ``(weight, out)``."""
    if (lora_a is not None) != call.lora_on:
        raise ValueError(f"Call.lora_on={call.lora_on} but lora_a is {'a tensor' if lora_a is not None else 'None'}.")
    if column and call.lora_on and call.rider is None:
        raise ValueError("a column operator with the branch on needs Call.rider (one Rider per forward).")
    if gemm is None:  # ColumnEntry: no GEMM of its own
        return
    weight, out = gemm
    if call.lora_on and (weight is None) == (out is None) or (weight is not None) != call.owns_gemm:
        raise ValueError(f"Call.owns_gemm={call.owns_gemm} needs exactly one of weight= (our GEMM) and "
                         "out= (a foreign GEMM's output).")
