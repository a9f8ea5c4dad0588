"""The one forward orchestration of every LoRA layer family (local, external GEMM, Transformer Engine).

A layer family differs only in who runs the base GEMM: the local layers own their weight and the
Join runs ``X W^T`` (``weight=``); the external-GEMM / TE layers run a communication-free GEMM
of their own between ColumnEntry and ColumnJoin (``local_gemm=``). Everything else is here, once:
the ``Call`` (branch on or off, the Rider of this forward, the recompute recipe), the dropout
mask of the logical branch input, the branch input (a fused norm's output or ``X_total``) and,
under SP, this rank's sequence chunk of it that dA needs (docs/design.md §2-§4).

What stays in a layer: its own bias and output conventions (skip_bias_add, gather_output,
input_is_parallel), and whether an inactive layer runs the base layer's own forward (local) or
still needs these operators for its collectives (external GEMM).

DoRA (``LoRAConfig.use_dora``, ``core/dora.py``): the operators' output is scaled by ``m / n`` and
the bias added after the scale; a column layer's norm is computed here, a row layer's partial
norms go into RowJoin's message.

``layer``: a ``LoRALayerMixin`` (``lora_A``, ``lora_b_for_gemm``, ``lora_group``, ``input_size``,
``_lora_branch``, ``_lora_dropout_mask``; ``weight`` and ``lora_magnitude`` with DoRA).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core import dora
from megatron_lora.core.ops import Call, Recipe, Rider, column_entry, column_join, row_join

# A foreign GEMM: this rank's shard, no TP communication; returns (out, bias not yet added or
# None, the fused norm's output or None).
LocalGEMM = Callable[[torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def take_recipe(layer, branch_input: torch.Tensor) -> Optional[Recipe]:
    """How to recompute ``branch_input`` in backward (``layer.lora_input_source``, set by
    ``recompute.attach_sources``), or None to keep it. Called on every forward, active or not, so
    a source never holds a tensor past its forward."""
    source = layer.lora_input_source
    return source.take(branch_input) if source is not None else None


def column_forward(layer, x: torch.Tensor, active: bool, *, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, local_gemm: Optional[LocalGEMM] = None,
                   recipe: Optional[Recipe] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``Y_i`` of a column layer and the foreign GEMM's bias (not added; None for our own GEMM).

    ``x``: this rank's input ([s/t, b, h] under SP, else [s, b, h]). Exactly one of ``weight``
    (our GEMM, ``bias`` added inside the Join; the branch must be ``active``) and ``local_gemm``.
    """
    branch = layer._lora_branch()
    call = Call(branch, lora_on=active, owns_gemm=weight is not None, rider=Rider() if active else None,
                recipe=recipe)
    x_total = column_entry(x, layer.lora_A if active else None, call)
    out = gemm_bias = norm_out = None
    if local_gemm is not None:
        out, gemm_bias, norm_out = local_gemm(x_total)
    if not active:
        return out, gemm_bias
    x_in = norm_out if norm_out is not None else x_total  # the branch sees a fused norm's output
    mask = layer._lora_dropout_mask(list(x_in.shape))  # the logical mask: the same on every rank
    chunk = None
    if branch.mode == "reduce_scatter":  # dA needs only this rank's sequence chunk of the branch input
        chunk = x if x_in is x_total else \
            x_in.detach().narrow(0, C.group_rank(branch.group) * x.shape[0], x.shape[0]).clone()
    use_dora = layer.lora_config.use_dora
    y = column_join(x_in, layer.lora_A, layer.lora_b_for_gemm(), call, weight=weight, out=out,
                    bias=None if use_dora else bias, mask=mask, chunk=chunk)
    if use_dora:  # whole rows: the norm is local (docs/design.md §18)
        norm = dora.local_norm_sq(layer, weight).sqrt_()
        y = dora.scale(y, layer.lora_magnitude, norm, bias=bias, grad_accum_fusion=branch.grad_accum_fusion)
    return y, gemm_bias


def row_forward(layer, x: torch.Tensor, active: bool, *, weight: Optional[torch.Tensor] = None,
                local_gemm: Optional[LocalGEMM] = None,
                recipe: Optional[Recipe] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``Y`` of a row layer, reduced, bias not added; and the foreign GEMM's bias (None for ours).

    ``x``: this rank's columns of the input, [s, b, h/t]. Exactly one of ``weight`` (our GEMM; the
    branch must be ``active``) and ``local_gemm``. The dropout mask is drawn for this rank's
    columns of the logical input only (``core/dropout.py``).
    """
    branch = layer._lora_branch()
    out = gemm_bias = None
    if local_gemm is not None:
        out, gemm_bias, _ = local_gemm(x)
    mask = None
    if active:
        width = x.shape[-1]
        mask = layer._lora_dropout_mask(list(x.shape[:-1]) + [layer.input_size],
                                        (C.group_rank(branch.group) * width, width))
    lora_a, lora_b = (layer.lora_A, layer.lora_b_for_gemm()) if active else (None, None)
    call = Call(branch, lora_on=active, owns_gemm=weight is not None, recipe=recipe)
    if not (active and layer.lora_config.use_dora):
        return row_join(x, lora_a, lora_b, call, weight=weight, out=out, mask=mask), gemm_bias
    # DoRA: this rank's columns give partial squared norms; their TP sum rides in the one reduction.
    y, norm_sq = row_join(x, lora_a, lora_b, call, weight=weight, out=out, mask=mask,
                          norm_sq=dora.local_norm_sq(layer, weight))
    norm = norm_sq.float().sqrt_()
    return dora.scale(y, layer.lora_magnitude, norm, grad_accum_fusion=branch.grad_accum_fusion), gemm_bias


def lora_repr(layer, base: str) -> str:
    """The one repr of a LoRA layer: ``base`` (the base layer's repr) with the adapter's settings."""
    c = layer.lora_config
    per_projection = f", per_projection={layer.lora_layout.projections}" \
        if layer.lora_row_projections is not None else ""
    dora = ", use_dora=True" if c.use_dora else ""
    return (f"{base[:-1]}, lora_rank={c.rank}, lora_alpha={c.alpha}{per_projection}{dora}, "
            f"lora_dropout={c.dropout}, merged={layer.lora_merged}, enabled={layer.lora_enabled})")
