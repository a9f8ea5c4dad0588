"""LoRA on Megatron-Core's Transformer Engine linears (the TE GPT spec). Needs CUDA and TE.

Only this module and grouped_experts.py import Transformer Engine (through te_import.py); nothing
on the local / CPU path imports them.

Each class is Megatron's TE wrapper, built exactly as Megatron builds it (same parameters,
initialisation, TP attributes, FP8 metadata), whose TE module is then made communication-free
(``_make_te_local``): TE runs the local GEMM of this rank's shard and the LoRA layer issues the
base layer's collectives with the branch joined before them (``external_gemm.py``). Switching
TE's communication off is the one way a branch can join TE's collective; the cost is that TE's
userbuffer comm/GEMM overlap (``tp_comm_overlap``) is not available, and is refused.

``TELayerNormColumnParallelLinear`` fuses the norm into the GEMM: TE is asked to return the norm
output (``return_layernorm_output``), which is the branch input, and TE adds the branch's gradient
to it before the norm's backward. Never the *gathered* norm output: TE drops its gradient.
Under SP the input is gathered before the fused norm, so each rank normalises the full sequence
(t x the norm's activation memory of Megatron's TE path; the norm FLOPs are negligible).

Parameter names and ``sharded_state_dict`` keys are those of the local LoRA layers, so adapters
move freely between local-spec and TE-spec models. FP8: TE's base GEMM stays FP8 under
``fp8_autocast``; the branch is plain torch math in the activation dtype (bf16).
"""

from __future__ import annotations

from megatron_lora.core import collectives as C
from megatron_lora.core import compat
from megatron_lora.core.external_gemm import ExternalGEMMLoRA
from megatron_lora.core.layers import is_gated_fc1, is_qkv
from megatron_lora.core.te_import import require_te

require_te("megatron_lora.core.te_layers", "use the local spec (--transformer-impl local)")

from megatron.core.extensions.transformer_engine import (  # noqa: E402
    TEColumnParallelLinear,
    TELayerNormColumnParallelLinear,
    TERowParallelLinear,
)

# The TE module attributes that decide its communication (TE 1.x-2.x names); checked, not assumed.
_TE_COMM_ATTRIBUTES = ("parallel_mode", "tp_size", "sequence_parallel", "return_bias", "apply_bias")
_TE_OVERLAP_FLAGS = ("ub_overlap_ag_fprop", "ub_overlap_rs_dgrad", "ub_bulk_wgrad", "ub_bulk_dgrad",
                     "ub_overlap_rs_fprop", "ub_overlap_ag_dgrad", "ub_overlap_ag", "ub_overlap_rs")


def check_te_config(config, layer_name: str) -> None:
    """Refuse settings a communication-free TE GEMM cannot honour, before anything is built."""
    if getattr(config, "tp_comm_overlap", False):
        raise ValueError(
            f"{layer_name}: LoRA on Transformer Engine layers issues the TP collectives itself "
            "(the branch must join them), so TE's userbuffer overlap cannot be used: drop "
            "--tp-comm-overlap (config.tp_comm_overlap=False).")
    if getattr(config, "symmetric_ar_type", None):
        raise ValueError(f"{layer_name}: symmetric_ar_type={config.symmetric_ar_type!r} is a TE "
                         "all-reduce option; LoRA TE layers issue their own all-reduce. Unset it.")


class _TELoRA(ExternalGEMMLoRA):
    """Shared by the TE LoRA layers. Class attributes: ``_te_base`` (Megatron's wrapper, also
    ``_base_class`` for ``from_base``), ``lora_parallel_mode``, ``lora_fused_norm``."""

    def __init__(self, input_size, output_size, *, lora_config, lora_init_name=None, **kwargs):
        check_te_config(kwargs["config"], type(self).__name__)
        if kwargs.get("is_expert"):
            raise ValueError(f"{type(self).__name__}: LoRA on Transformer Engine expert layers is "
                             "not supported; build MoE experts with the local spec.")
        self._te_base.__init__(self, input_size, output_size, **kwargs)
        name = kwargs.get("tp_comm_buffer_name")
        self._become_lora(lora_config, is_gated_fc1(self.config, name), lora_init_name, is_qkv(name))

    @property
    def _base_tp_axes(self):
        return {"weight": 0, "bias": 0} if self.lora_parallel_mode == "column" else {"weight": 1}

    def _become_lora(self, lora_config, gated, lora_init_name, qkv=False):
        check_te_config(self.config, type(self).__name__)
        group = compat.te_tp_group(self)
        world = C.group_size(group)
        if self.lora_parallel_mode == "column":
            sizes = (self.in_features, self.out_features * world)
        else:
            sizes = (self.in_features * world, self.out_features)
        skip_bias_add = bool(self.te_return_bias)  # Megatron: skip_bias_add and bias
        self._make_te_local(bias_after_gemm=self.lora_parallel_mode == "row" or lora_config.use_dora)
        self._init_external(*sizes, group, skip_bias_add)
        self._setup_lora(lora_config, gated, lora_init_name, qkv)

    def _make_te_local(self, bias_after_gemm: bool) -> None:
        """Turn the built TE module into a local GEMM of this rank's shard (no TP communication).

        Its parameters keep the shard shapes and the TP / sequence-parallel attributes TE and
        Megatron gave them, which is what our collectives need (a row bias added after the
        reduce-scatter is partial per sequence chunk, as in TE). ``bias_after_gemm``: TE returns
        its bias instead of adding it, and the layer adds it later: after a row layer's reduction,
        after DoRA's magnitude scale (the bias is outside it, docs/design.md §18).
        """
        missing = [a for a in _TE_COMM_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: this Transformer Engine version has no {missing} on its "
                "linear modules; megatron_lora's TE layers are written against TE 1.x-2.x.")
        busy = [f for f in _TE_OVERLAP_FLAGS if getattr(self, f, False)]
        if busy:
            raise ValueError(f"{type(self).__name__}: TE userbuffer overlap {busy} is on; "
                             "LoRA TE layers need config.tp_comm_overlap=False.")
        self.parallel_mode = None
        self.tp_size = 1
        self._te_base.set_tensor_parallel_group(self, None)
        self.sequence_parallel = False
        if bias_after_gemm and self.use_bias:
            # A row bias must be added after our reduction, never once per rank before it.
            self.return_bias, self.apply_bias = True, False
            if hasattr(self, "gemm_bias_unfused_add"):
                self.gemm_bias_unfused_add = False
        if self.lora_fused_norm:
            self.return_layernorm_output = True
            self.return_layernorm_output_gathered = False

    def _local_gemm(self, x):
        raw = self._te_base.forward(self, x)  # Megatron's wrapper: FP8 context, weight caching
        te_out = raw if self.te_return_bias else raw[0]
        items = te_out if isinstance(te_out, tuple) else (te_out,)
        bias = items[1] if self.return_bias else None
        norm_out = items[-1] if self.lora_fused_norm else None
        return items[0], bias, norm_out

    def set_tensor_parallel_group(self, tp_group) -> None:
        """TE's setter. Once LoRA is set up TE stays communication-free: it always gets None."""
        lora_group = getattr(self, "lora_tp_group", None)
        if lora_group is None:  # still inside TE's own __init__
            self._te_base.set_tensor_parallel_group(self, tp_group)
        elif tp_group is not None and tp_group is not lora_group:
            raise RuntimeError(f"{type(self).__name__}: the TP group cannot change after LoRA setup.")

    def _lora_base_repr(self) -> str:
        """TE's own repr lists its internals; the adapter's settings follow (``LoRALayerMixin.__repr__``)."""
        return (f"{type(self).__name__}(in={self.input_size}, out={self.output_size}, "
                f"TP={C.group_size(self.lora_group)}, bias={self.use_bias})")


class LoRATELayerNormColumnParallelLinear(_TELoRA, TELayerNormColumnParallelLinear):
    """TELayerNormColumnParallelLinear + LoRA on the normalised input (linear_qkv, linear_fc1)."""

    _base_class = _te_base = TELayerNormColumnParallelLinear
    lora_parallel_mode, lora_fused_norm = "column", True


class LoRATEColumnParallelLinear(_TELoRA, TEColumnParallelLinear):
    """TEColumnParallelLinear + LoRA."""

    _base_class = _te_base = TEColumnParallelLinear
    lora_parallel_mode, lora_fused_norm = "column", False


class LoRATERowParallelLinear(_TELoRA, TERowParallelLinear):
    """TERowParallelLinear + LoRA (linear_proj, linear_fc2)."""

    _base_class = _te_base = TERowParallelLinear
    lora_parallel_mode, lora_fused_norm = "row", False


LORA_FOR_TE_BASE = {cls._base_class: cls for cls in (
    LoRATELayerNormColumnParallelLinear, LoRATEColumnParallelLinear, LoRATERowParallelLinear)}
# Grouped MoE experts (TEGroupedMLP, moe_grouped_gemm) join the map: core/grouped_experts.py.
from megatron_lora.core.grouped_experts import LORA_FOR_GROUPED_BASE  # noqa: E402

LORA_FOR_TE_BASE.update(LORA_FOR_GROUPED_BASE)
