"""LoRA around a base GEMM we do not own (Transformer Engine), with the base layer's collectives.

Transformer Engine's parallel linears issue their TP communication inside their own autograd
node, where no LoRA branch can join it. So a TE LoRA layer switches TE's communication off (TE
then runs a local GEMM on this rank's shard, as Megatron does for expert layers) and the layer
issues the base layer's collectives itself, with the LoRA branch joined before them:

    column:  X ─► ColumnEntry ─► X_total ─► [TE: (norm,) GEMM_i] ─► out_i ─► ColumnJoin ─► Y_i
             (SP: all-gather X;               └─ branch input: norm output or X_total ─┘
              backward: ONE all-reduce / reduce-scatter of [dX_total | dY_i B_i])
    row:     X_i ─► [TE: GEMM_i] ─► out_i ─► RowJoin ─► Y
                                     (+ s drop(X_i) A_i^T B^T, then ONE all-reduce /
                                      reduce-scatter of [Y_i | X_i A_i^T]; SP backward: all-gather dY)

Same collectives, same rank-r rider and same math as ``functions.py`` (DESIGN §2-3); only the
base GEMM sits outside our operators. ColumnJoin hands the rank-r term ``dY_i B_i`` to
ColumnEntry through a ``_Rider``: autograd runs ColumnEntry's backward only after every consumer
of ``X_total`` (TE's node and ColumnJoin) has run, so the term is there when the collective goes.

``ExternalGEMMLoRA`` is the layer logic on top of these operators; a subclass supplies only
``_local_gemm``. The CPU tests drive it with a plain-torch GEMM at TP = 1, 2 (SP on and off), and
run the TE layers themselves on a CPU double of TE (tests/te_double.py), so the TP > 1 math of
the TE layers is covered without a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core.ops import _dropped, _flat, deliver_factor_grads, main_grads_for
from megatron_lora.core.layers import LoRALayerMixin
from megatron_lora.core.layout import AdapterLayout


class _Rider:
    """ColumnJoin's backward terms for ColumnEntry's collective (lives for one forward)."""

    __slots__ = ("g", "branch_chunk", "mask_chunk")

    def __init__(self):
        self.g = self.branch_chunk = self.mask_chunk = None


class ColumnEntry(torch.autograd.Function):
    """Column layer input: SP all-gather; backward the ONE reduction of ``[dX_total | dY_i B_i]``.

    ``lora_a`` is an input only so that its complete gradient, which needs the reduced rank-r
    term, is returned here; ``rider`` is None when the branch is off (then only dX is reduced).
    """

    @staticmethod
    def forward(ctx, x, lora_a, rider, scaling, p, group, mode, fuse):
        ctx.rider, ctx.scaling, ctx.p, ctx.group, ctx.mode = rider, scaling, p, group, mode
        ctx.fused = main_grads_for((lora_a,), fuse) if lora_a is not None else None
        return C.all_gather_first_dim(x, group) if mode == "reduce_scatter" else x.view_as(x)

    @staticmethod
    def backward(ctx, dx_total):
        rider = ctx.rider
        if rider is None or rider.g is None:  # branch off, or it received no gradient
            return C.reduce(dx_total.contiguous(), ctx.group, ctx.mode), None, None, None, None, None, None, None
        dx, g_sum = C.reduce_with_rider(dx_total.contiguous(), rider.g, ctx.group, ctx.mode)
        x_in = _dropped(rider.branch_chunk, rider.mask_chunk, ctx.p)
        d_a = ctx.scaling * _flat(g_sum).t().matmul(_flat(x_in))
        (d_a,) = deliver_factor_grads(ctx.fused, (d_a,))
        rider.g = rider.branch_chunk = rider.mask_chunk = None
        return dx, d_a, None, None, None, None, None, None


class ColumnJoin(torch.autograd.Function):
    """``Y_i = out_i + s (drop(X_in) A^T) B_i^T``; dA is finished by ColumnEntry (see above).

    ``chunk`` = (start, length) of this rank's sequence chunk under SP (the part of the branch
    input dA needs, DESIGN §3), else None.
    """

    @staticmethod
    def forward(ctx, out, x_in, lora_a, lora_b, scaling, mask, p, rider, chunk, fuse):
        u = torch.matmul(_dropped(x_in, mask, p), lora_a.t())  # [s, b, r]
        y = torch.addmm(_flat(out), _flat(u), lora_b.t(), alpha=scaling).view_as(out)
        keep, keep_mask = x_in, mask
        if chunk is not None:  # only this rank's chunk is needed for dA: do not keep the rest
            keep = x_in.narrow(0, *chunk).clone()
            keep_mask = None if mask is None else mask.narrow(0, *chunk).clone()
        ctx.save_for_backward(lora_a, lora_b, u, mask, keep, keep_mask)
        ctx.scaling, ctx.p, ctx.rider = scaling, p, rider
        ctx.fused = main_grads_for((lora_b,), fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        lora_a, lora_b, u, mask, keep, keep_mask = ctx.saved_tensors
        s = ctx.scaling
        g = torch.matmul(dy, lora_b)  # [s, b, r]: this rank's term of dY B
        d_in = None
        if ctx.needs_input_grad[1]:
            d_in = _dropped(torch.matmul(g, lora_a) * s, mask, ctx.p)
        d_b = s * _flat(dy).t().matmul(_flat(u))
        (d_b,) = deliver_factor_grads(ctx.fused, (d_b,))
        ctx.rider.g, ctx.rider.branch_chunk, ctx.rider.mask_chunk = g, keep, keep_mask
        return dy, d_in, None, d_b, None, None, None, None, None, None


class RowJoin(torch.autograd.Function):
    """``Y = sum_i out_i + s (drop(X_i) A_i^T) B^T`` in ONE reduction of ``[Y_i | X_i A_i^T]``.

    With ``lora_a`` None the branch is off and only the base output is reduced.
    """

    @staticmethod
    def forward(ctx, out, x, lora_a, lora_b, scaling, mask, p, group, mode, fuse):
        ctx.scaling, ctx.p, ctx.group, ctx.mode = scaling, p, group, mode
        ctx.active = lora_a is not None
        if not ctx.active:
            return C.reduce(out.contiguous(), group, mode) if mode != "none" else out.view_as(out)
        h = torch.matmul(_dropped(x, mask, p), lora_a.t())  # [s, b, r]: rank i's term
        y = torch.addmm(_flat(out), _flat(h), lora_b.t(), alpha=scaling).view_as(out)
        y, h_sum = C.reduce_with_rider(y, h, group, mode)
        ctx.save_for_backward(x, lora_a, lora_b, h_sum.contiguous(), mask)
        ctx.fused = main_grads_for((lora_a, lora_b), fuse)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.mode == "reduce_scatter":
            dy_total = C.all_gather_first_dim(dy, ctx.group)
        else:
            dy_total = dy
        if not ctx.active:
            return dy_total, None, None, None, None, None, None, None, None, None
        x, lora_a, lora_b, h_sum, mask = ctx.saved_tensors
        s = ctx.scaling
        d_b = s * _flat(dy).t().matmul(_flat(h_sum))  # SP: this chunk's part
        g = torch.matmul(dy_total, lora_b)  # identical on every rank
        d_x = _dropped(torch.matmul(g, lora_a) * s, mask, ctx.p) if ctx.needs_input_grad[1] else None
        d_a = s * _flat(g).t().matmul(_flat(_dropped(x, mask, ctx.p)))
        d_a, d_b = deliver_factor_grads(ctx.fused, (d_a, d_b))
        return dy_total, d_x, d_a, d_b, None, None, None, None, None, None


class ExternalGEMMLoRA(LoRALayerMixin):
    """A LoRA layer whose base is a communication-free local GEMM.

    Subclasses set ``lora_parallel_mode`` ("column" | "row") and ``lora_fused_norm`` (the GEMM
    normalises its input first, and the branch must see the normalised input), and implement
    ``_local_gemm(x) -> (out, bias or None, norm output or None)``: the GEMM of this rank's shard
    with no TP communication; a returned bias is NOT yet added. ``lora_skip_bias_add`` keeps
    Megatron's skip_bias_add meaning. Forward returns Megatron's ``(output, bias)``.
    """

    lora_parallel_mode = "column"
    lora_fused_norm = False

    def _init_external(self, input_size: int, output_size: int, group, skip_bias_add: bool):
        self.input_size, self.output_size = input_size, output_size
        self.lora_tp_group = group
        self.lora_skip_bias_add = skip_bias_add
        self.is_expert = self.expert_parallel = False

    @property
    def lora_group(self):
        return self.lora_tp_group

    def _branch_sequence_parallel(self) -> bool:
        return bool(self.config.sequence_parallel) and C.group_size(self.lora_group) > 1

    def _lora_layout(self, gated: bool) -> AdapterLayout:
        if self.lora_parallel_mode == "column":
            return AdapterLayout.column(gated=gated)
        return AdapterLayout.row()

    def _comm_mode(self) -> str:
        if C.group_size(self.lora_group) == 1:
            return "none"
        return "reduce_scatter" if self._branch_sequence_parallel() else "all_reduce"

    def _check_trainable_norm(self) -> None:
        """A fused norm sees partial gradients at TP > 1 (its collective runs after it in backward)."""
        norm = [p for n, p in self.named_parameters(recurse=False) if n.startswith("layer_norm_")]
        if (any(p.requires_grad for p in norm) and torch.is_grad_enabled()
                and self._comm_mode() == "all_reduce"):
            raise RuntimeError(
                f"{type(self).__name__}: the fused norm's weights are trainable at TP > 1 without "
                "sequence parallelism; their gradients would be TP-partial and never summed. LoRA "
                "keeps them frozen (apply_lora does); freeze them, or enable --sequence-parallel.")

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        active = self._lora_active()
        mode, group = self._comm_mode(), self.lora_group
        fuse = self.config.gradient_accumulation_fusion
        s, p = self.lora_scaling, self.lora_config.dropout
        if self.lora_parallel_mode == "row":
            out, bias, _ = self._local_gemm(x)
            if active:
                width = self.input_size // C.group_size(group)
                mask = self._lora_dropout_mask(
                    list(x.shape[:-1]) + [self.input_size], (-1, C.group_rank(group) * width, width))
                y = RowJoin.apply(out, x, self.lora_A, self.lora_B, s, mask, p, group, mode, fuse)
            else:
                y = RowJoin.apply(out, x, None, None, s, None, p, group, mode, fuse)
            if self.lora_skip_bias_add or bias is None:
                return y, bias
            return y + bias, None
        if self.lora_fused_norm:
            self._check_trainable_norm()
        rider = _Rider() if active else None
        x_total = ColumnEntry.apply(x, self.lora_A if active else None, rider, s, p, group, mode, fuse)
        out, bias, norm_out = self._local_gemm(x_total)
        if active:
            x_in = norm_out if self.lora_fused_norm else x_total
            mask = self._lora_dropout_mask(list(x_in.shape))  # the logical mask, same on all ranks
            chunk = (C.group_rank(group) * x.shape[0], x.shape[0]) if mode == "reduce_scatter" else None
            out = ColumnJoin.apply(out, x_in, self.lora_A, self.lora_B, s, mask, p, rider, chunk, fuse)
        if bias is not None and not self.lora_skip_bias_add:
            return out + bias, None
        return out, bias
