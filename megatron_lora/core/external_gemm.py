"""LoRA around a base GEMM we do not own (Transformer Engine), with the base layer's collectives.

Transformer Engine's parallel linears issue their TP communication inside their own autograd
node, where no LoRA branch can join it. So a TE LoRA layer switches TE's communication off (TE
then runs a local GEMM on this rank's shard, as Megatron does for expert layers) and the layer
issues the base layer's collectives itself through the operators of ``ops.py``, the same ones
the local layers use, with the foreign GEMM between ColumnEntry and ColumnJoin (docs/design.md §4):

    column:  X ─► ColumnEntry ─► X_total ─► [TE: (norm,) GEMM_i] ─► out_i ─► ColumnJoin ─► Y_i
                                             └─ branch input: norm output or X_total ─┘
    row:     X_i ─► [TE: GEMM_i] ─► out_i ─► RowJoin ─► Y

``ExternalGEMMLoRA`` runs the one forward of every LoRA layer (``layer_forward.py``) with its
foreign GEMM; a subclass supplies only ``_local_gemm``. The CPU tests drive it with a plain-torch
GEMM at TP = 1, 2 (SP on and off), and run the TE layers themselves on a CPU double of TE
(tests/te_double.py), so the TP > 1 math of the TE layers is covered without a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core import layer_forward
from megatron_lora.core.layers import LoRALayerMixin
from megatron_lora.core.layout import AdapterLayout


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

    def _lora_layout(self, gated: bool, n_projections: int = 1) -> AdapterLayout:
        if self.lora_parallel_mode == "column":
            return AdapterLayout.column(gated=gated, projections=n_projections)
        return AdapterLayout.row()

    def _comm_mode(self) -> str:
        return C.comm_mode(C.group_size(self.lora_group), bool(self.config.sequence_parallel))

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
        if self.lora_parallel_mode == "row":
            y, bias = layer_forward.row_forward(self, x, active, local_gemm=self._local_gemm)
            if self.lora_skip_bias_add or bias is None:
                return y, bias
            return y + bias, None
        if self.lora_fused_norm:
            self._check_trainable_norm()
        out, bias = layer_forward.column_forward(self, x, active, local_gemm=self._local_gemm)
        if bias is not None and not self.lora_skip_bias_add:
            return out + bias, None
        return out, bias
