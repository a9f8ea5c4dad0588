"""LoRA on a mixture-of-experts router's gating (target ``router``, opt-in).

Megatron's ``TopKRouter`` scores each token against every expert with one replicated weight
``W: [experts, hidden]``: ``logits = X W^T`` in the router's dtype (``moe_router_dtype``). With
LoRA, ``logits = X W^T + s (drop(X) A^T) B^T``, ``A: [r, hidden]``, ``B: [experts, r]``.

Both factors are replicated on every rank, like ``W``: the router runs on this rank's own tokens
(its sequence chunk under SP) and issues no collective, so the branch issues none either. The
factors' gradients are partial sums over TP exactly when ``W``'s are (under SP), so they carry
``W``'s ``sequence_parallel`` flag and ``finalize_model_grads`` sums them with it; DDP reduces
them over the data-parallel group, as ``W``. ``A`` is drawn from the module's name and the seed on
every rank (``core/init.py``): identical everywhere without a message.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.layers import LoRALayerMixin
from megatron_lora.core.layout import AdapterLayout


class LoRATopKRouter(TopKRouter, LoRALayerMixin):
    """``TopKRouter`` whose gating logits get a rank-r LoRA term (made in place by ``from_base``).

    The mixin comes second: the router's ABC base makes a class with the mixin first differ in
    object layout, and ``from_base`` swaps the class of a built router. Nothing of the mixin is
    shadowed by the router except ``__repr__``, defined here again."""

    _base_class = TopKRouter
    _base_tp_axes: dict = {}
    is_expert = False

    def __init__(self, *args, lora_config: LoRAConfig, lora_init_name: Optional[str] = None, **kwargs):
        """Built from a spec (megatron-core 0.19's ``MoESubmodules.router``): the router's own
        arguments plus ``lora_config``."""
        super().__init__(*args, **kwargs)
        self._become_lora(lora_config, False, lora_init_name)

    @property
    def lora_group(self):
        return None  # replicated everywhere; A comes from the seed on every rank

    @property
    def input_size(self) -> int:
        return self.config.hidden_size

    @property
    def output_size(self) -> int:
        return self.config.num_moe_experts

    def _become_lora(self, lora_config: LoRAConfig, gated: bool, lora_init_name, qkv: bool = False):
        if lora_config.per_projection:
            raise ValueError("LoRA on the router: per_projection applies to fused linear_qkv / linear_fc1 only; "
                             "drop 'router' from the targets or per_projection.")
        if lora_config.use_dora:
            raise ValueError("DoRA on the router (--lora-use-dora) is not supported: drop 'router' from "
                             "--lora-target-modules, or drop --lora-use-dora.")
        self._setup_lora(lora_config, False, lora_init_name)

    def _lora_layout(self, gated: bool, n_projections: int = 1) -> AdapterLayout:
        return AdapterLayout(a_dim=None, b_dim=None)

    def _comm_mode(self) -> str:
        return "none"

    def _lora_grad_is_partial(self) -> bool:
        return bool(self.config.sequence_parallel)

    def gating(self, input: torch.Tensor):
        logits = super().gating(input)
        if not self._lora_active():
            return logits
        x = input.to(logits.dtype)
        mask = self._router_dropout_mask(x)
        if mask is not None:
            x = x * mask / (1.0 - self.lora_config.dropout)
        u = F.linear(x, self.lora_A.to(logits.dtype))
        return logits + self.lora_scaling * F.linear(u, self.lora_B.to(logits.dtype))

    def _router_dropout_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's rows of the logical input's mask (its sequence chunk under SP), as the
        column layers draw theirs (``core/dropout.py``): the same at every TP size."""
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
        mask = self._lora_dropout_mask((x.shape[0] * tp, *x.shape[1:]))
        if mask is None or tp == 1:
            return mask
        return mask.narrow(0, parallel_state.get_tensor_model_parallel_rank() * x.shape[0], x.shape[0])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's own router view: every tensor replicated, the factors included."""
        return TopKRouter.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def _lora_base_repr(self) -> str:
        return f"{TopKRouter.__name__}(hidden={self.input_size}, experts={self.output_size})"

    def __repr__(self):
        return LoRALayerMixin.__repr__(self)
