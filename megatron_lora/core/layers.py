"""LoRA subclasses of Megatron-Core's ColumnParallelLinear / RowParallelLinear.

    X ──► [frozen W_i] ───────────────┐
    │                                 (+) ──► base layer's ONE collective ──► Y
    └─► dropout ─► A ─► B_i ─► × s ───┘          (the rank-r u = drop(X)A^T rides along)

Drop-in: same constructor arguments (plus ``lora_config``), same ``(output, bias)`` return, same
bias / skip_bias_add / gather_output / input_is_parallel / sequence-parallel semantics, and the
layer's own ``tp_group`` (expert layers get the expert-TP group from the base class).

| layer  | lora_A                       | lora_B                       | TP attributes on      |
|--------|------------------------------|------------------------------|-----------------------|
| column | [r, in] replicated           | [out/t, r] sharded on dim 0  | lora_B only           |
| row    | [r, in/t] sharded on dim 1   | [out, r] replicated          | lora_A only           |

DoRA (``LoRAConfig.use_dora``, ``core/dora.py``) adds ``lora_magnitude [out]``, laid out like the
output: sharded on dim 0 (with TP attributes) in a column layer, replicated in a row layer (marked
``sequence_parallel`` under SP, like the replicated factor).

With ``LoRAConfig.per_projection`` a fused column layer of P projections (``linear_qkv``, gated
``linear_fc1``) has ``lora_A [P*r, in]`` and the operators get B in block form (``lora_b_for_gemm``,
``core/projections.py``); shapes of B, sharding and collectives are the table's.

Replicated-factor gradient (docs/design.md §3; §10, trap 2): the TP sum the replicated factor's
gradient needs is computed INSIDE the base layer's one collective (``ops.py``), so without SP the
gradient is complete and bitwise identical on all TP ranks in any training loop; under SP the
replicated factor carries ``sequence_parallel = True`` and Megatron's ``finalize_model_grads``
sums it in the all-reduce it already issues for sequence-parallel norm weights. Replicated
factors carry no ``tensor_model_parallel`` attribute, so grad-norm clipping counts them once
(trap 8). Both factors take the base weight's ``allreduce`` flag (the DDP group it is reduced
over); expert factors always reduce over the expert-data-parallel group. An expert layer at
expert-TP > 1 issues nothing itself: the token dispatcher reduces (mode ``"partial"`` or
``"rider_only"``, docs/design.md §3, §17).

Dropout rule: the mask is that of the LOGICAL (unsharded, full-sequence) branch input, drawn from
the default generator, which Megatron keeps in sync across the TP group. A column layer draws it
whole; a row layer draws and keeps only its own columns, from the mask's column blocks
(``core/dropout.py``). Replicated inputs therefore see the same mask on every TP rank, and the
mask does not depend on the TP size at all.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

from megatron_lora.core import collectives as C
from megatron_lora.core import layer_forward, projections, shard_merge
from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.dropout import dropout_mask
from megatron_lora.core.init import init_lora_factors
from megatron_lora.core.layout import AdapterLayout
from megatron_lora.core.ops import Branch
from megatron_lora.core.sharded_state import LORA_FACTORS, LORA_TENSORS, lora_sharded_state_dict


def is_lora_key(key: str) -> bool:
    """True for a LoRA tensor's parameter / state-dict / checkpoint key (``...linear_qkv.lora_A``,
    DoRA's ``...lora_magnitude``)."""
    return key.rsplit(".", 1)[-1] in LORA_TENSORS


def is_gated_fc1(config, name: Optional[str]) -> bool:
    """Whether a layer's rows are ``[gate; up]`` per TP shard (docs/design.md §7): ``linear_fc1``
    of a gated MLP. ``name``: the module name, or the ``tp_comm_buffer_name`` ("fc1") Megatron's
    MLP builds it with, which is all a constructor sees."""
    return name in ("linear_fc1", "fc1") and bool(getattr(config, "gated_linear_unit", False))


def is_qkv(name: Optional[str]) -> bool:
    """Whether a layer is the fused ``linear_qkv`` (module name, or the ``tp_comm_buffer_name``
    "qkv" of Megatron's attention): its rows are q, k and v per query group."""
    return name in ("linear_qkv", "qkv")


def _finalize_sums_over(config, group) -> bool:
    """Whether Megatron's ``finalize_model_grads`` sums ``sequence_parallel`` gradients over
    exactly the ranks of ``group``: it does so over the TP group when the config has SP. True for
    an expert-TP group equal to the TP group (Megatron's default expert-TP size)."""
    if not getattr(config, "sequence_parallel", False) or C.group_size(group) == 1:
        return False
    tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if tp_group is None:
        return False
    return dist.get_process_group_ranks(group) == dist.get_process_group_ranks(tp_group)


class LoRALayerMixin:
    """The adapter's parameters and switches, shared by every LoRA layer family.

    What lives elsewhere, beside the code it serves: the forward (``layer_forward.py``, one for
    every family; the subclasses only add their base layer's conventions), merge with its CPU copy
    (``shard_merge.py``), the distributed-checkpoint view (``sharded_state.py``) and the recompute
    sources (``recompute.py``). The public methods here delegate to them.
    """

    # A ``recompute`` source (set by apply_lora with recompute_branch_input): recomputes the
    # branch input in backward from what the base keeps anyway. None: the input is saved.
    lora_input_source = None

    @property
    def lora_group(self):
        """The TP group the factors are laid out over (the layer's own, docs/design.md §1)."""
        return self.tp_group

    def _setup_lora(self, lora_config: LoRAConfig, gated: bool, lora_init_name: Optional[str], qkv: bool = False):
        if not isinstance(lora_config, LoRAConfig):
            raise TypeError(
                f"{type(self).__name__} needs lora_config=LoRAConfig(...), got {type(lora_config).__name__}."
            )
        if getattr(self, "gtp_remat_size", 1) > 1:
            raise ValueError(
                f"{type(self).__name__}: the base weight is GTP-sharded (gtp_remat_size="
                f"{self.gtp_remat_size}, megatron-core 0.19's weight rematerialisation), which LoRA "
                "layers do not support; build the model without a gtp_remat process group.")
        self.lora_config = lora_config
        self.lora_scaling = lora_config.scaling
        # Per-projection LoRA (core/projections.py): which projection each logical row feeds.
        row_projection = projections.logical_row_projections(self.config, self.output_size, qkv, gated) \
            if lora_config.per_projection else None
        self.lora_row_projections = row_projection
        self.lora_layout = self._lora_layout(gated, 1 if row_projection is None else int(row_projection.max()) + 1)
        self.lora_enabled = True
        self.lora_merged = False
        self.lora_init_name = None  # set by init_lora_factors
        if lora_config.rank > min(self.input_size, self.output_size):
            raise ValueError(
                f"{type(self).__name__}: LoRA rank {lora_config.rank} exceeds the layer's smaller side "
                f"(in {self.input_size}, out {self.output_size}); choose a rank <= "
                f"{min(self.input_size, self.output_size)}.")
        world = C.group_size(self.lora_group)
        ref = self.weight
        # Megatron's own rule for where a layer allocates its parameters.
        cpu_init = self.config.use_cpu_initialization
        device = ref.device if ref is not None else "cpu" if cpu_init else torch.cuda.current_device()
        dtype = ref.dtype if ref is not None else self.config.params_dtype
        # DDP reduces a parameter with allreduce=False over the expert-data-parallel group: the
        # factors of an expert layer always take it. Each rank's experts see their own tokens, so
        # that is their data-parallel group on every release; megatron-core 0.16 marks expert
        # weights allreduce=True at EP=1 even where expert-TP differs from TP (0.19 does not).
        base_allreduce = getattr(ref, "allreduce", True)
        allreduce = False if self.is_expert else base_allreduce
        self._lora_partial_grads_summed = _finalize_sums_over(self.config, self.tp_group) \
            if self.is_expert else False
        for factor in self.lora_tensor_names():
            shape = self.lora_layout.local_shape(factor, self.lora_logical_shape(factor), world)
            param = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            dim = self.lora_layout.partition_dim(factor)
            if dim is not None:
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
            else:
                param.sequence_parallel = self._lora_grad_is_partial()
            param.allreduce = allreduce
            setattr(self, factor, param)
        if row_projection is not None:  # this rank's rows of B_block, sharded like lora_B
            local = self.lora_layout.shard("lora_B", row_projection, C.group_rank(self.lora_group), world)
            self._lora_b_columns = projections.column_index(local, lora_config.rank).to(device)
        if lora_init_name is not None:
            init_lora_factors(self, lora_init_name)

    def lora_tensor_names(self) -> tuple:
        """The adapter's parameters: the two factors, and DoRA's magnitude (``core/dora.py``)."""
        return LORA_TENSORS if self.lora_config.use_dora else LORA_FACTORS

    def _lora_grad_is_partial(self) -> bool:
        """Whether the replicated factor's gradient is a partial sum to be summed per step: when
        the layer's collective is a reduce-scatter (SP) or the dispatcher's ("partial", experts)."""
        return self._comm_mode() in ("reduce_scatter", "partial")

    def lora_b_for_gemm(self, logical_b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B as the operators and every merge multiply it: ``lora_B`` itself, or with per-projection
        LoRA the block-structured ``[rows, P*r]`` B (``core/projections.py``) of this rank's
        ``lora_B``, or of ``logical_b``, the gathered logical one."""
        b = self.lora_B if logical_b is None else logical_b
        if self.lora_row_projections is None:
            return b
        if logical_b is None:
            columns = self._lora_b_columns
            if columns.device != b.device:  # the model was moved after it was built
                columns = self._lora_b_columns = columns.to(b.device)
        else:
            columns = projections.column_index(self.lora_row_projections.to(b.device), self.lora_config.rank)
        return projections.block_structured_b(b, columns, self.lora_layout.projections)

    def lora_logical_shape(self, factor: str):
        return self.lora_layout.logical_shapes(self.input_size, self.output_size, self.lora_config.rank)[factor]

    def _lora_active(self) -> bool:
        if self.lora_init_name is None:
            raise RuntimeError(
                f"{type(self).__name__}: LoRA factors were never initialised. After building a model "
                "from a LoRA layer spec call megatron_lora.apply_lora(model, cfg), which initialises "
                "them TP-aware and freezes the base; or pass lora_init_name= to the constructor."
            )
        return self.lora_enabled and not self.lora_merged

    def _lora_branch(self) -> Branch:
        """This call's branch settings (the collective mode is the base layer's, see ``_comm_mode``)."""
        return Branch(self.lora_scaling, self.lora_config.dropout, self.lora_group, self._comm_mode(),
                      self.config.gradient_accumulation_fusion, self.lora_config.branch_kernels)

    def _lora_dropout_mask(self, logical_shape, columns=None) -> Optional[torch.Tensor]:
        """Keep-mask of the logical branch input (``core/dropout.py``); None when inactive.
        ``columns``: ``(start, length)`` of the last dim, a row layer's slice: only it is drawn."""
        p = self.lora_config.dropout
        if p == 0.0 or not self.training:
            return None
        return dropout_mask(logical_shape, p, self.lora_A.device, columns)

    def lora_delta(self) -> torch.Tensor:
        """``s * B @ A`` for this rank's base shard (local by construction, docs/design.md §1). With
        DoRA the merged weight is not ``W + delta``: see ``merge``."""
        return shard_merge.lora_delta(self)

    def merge(self) -> None:
        """Fold the adapter into the local base shard; forward then runs the plain base path
        (``shard_merge.merge``: the unmerged shard is kept on the CPU until ``unmerge``). With DoRA
        the shard becomes ``(m / n) ⊙ (W_i + s·B·A)``; a row layer's merge is then collective over
        its TP group (one all-reduce of the norm's partial squares)."""
        shard_merge.merge(self)

    def unmerge(self) -> None:
        """Undo ``merge``: the base shard gets back exactly the bits it had."""
        shard_merge.unmerge(self)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Base tensors as Megatron shards them, LoRA factors by their declared layout
        (``sharded_state.lora_sharded_state_dict``)."""
        return lora_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    @classmethod
    def from_base(cls, base, lora_config: LoRAConfig, gated: bool = False, lora_init_name=None, qkv: bool = False):
        """Turn a built base layer into this LoRA layer in place: base weights are not copied.
        ``gated`` / ``qkv``: the layer is a gated ``linear_fc1`` / the fused ``linear_qkv``."""
        expected = cls._base_class
        if type(base) is not expected:
            raise TypeError(f"{cls.__name__}.from_base expects a {expected.__name__}, got {type(base).__name__}.")
        base.__class__ = cls
        base._become_lora(lora_config, gated, lora_init_name, qkv)
        return base

    def _become_lora(self, lora_config: LoRAConfig, gated: bool, lora_init_name, qkv: bool = False):
        self._setup_lora(lora_config, gated, lora_init_name, qkv)

    def _lora_base_repr(self) -> str:
        return super().__repr__()

    def __repr__(self):
        return layer_forward.lora_repr(self, self._lora_base_repr())


class LoRAColumnParallelLinear(LoRALayerMixin, ColumnParallelLinear):
    """ColumnParallelLinear + LoRA: ``Y_i = X W_i^T + s (drop(X) A^T) B_i^T`` then the base gather.

    Collectives (exactly the base layer's): forward all-gather of X under SP and of Y when
    ``gather_output``; backward ONE all-reduce (reduce-scatter under SP) of ``[dX | dY_i B_i]``.
    """

    _base_class = ColumnParallelLinear
    _base_tp_axes = {"weight": 0, "bias": 0}

    def __init__(self, input_size, output_size, *, lora_config: LoRAConfig,
                 lora_init_name: Optional[str] = None, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        name = kwargs.get("tp_comm_buffer_name")
        self._setup_lora(lora_config, is_gated_fc1(self.config, name), lora_init_name, is_qkv(name))

    def _lora_layout(self, gated: bool, n_projections: int = 1) -> AdapterLayout:
        return AdapterLayout.column(gated=gated, projections=n_projections)

    def _comm_mode(self) -> str:
        # Megatron's column layer: explicit expert communication turns SP and the dX reduction
        # off, disable_grad_reduce the dX reduction only.
        return C.comm_mode(C.group_size(self.tp_group), self.sequence_parallel and not self.explicit_expert_comm,
                           base_reduces=not (self.explicit_expert_comm or self.disable_grad_reduce),
                           partial_grads_summed=self._lora_partial_grads_summed and self.explicit_expert_comm)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        recipe = layer_forward.take_recipe(self, input_)
        if not self._lora_active():
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if weight is None:
            if self.weight is None:
                raise RuntimeError("weight was not supplied to LoRAColumnParallelLinear forward and "
                                   "skip_weight_param_allocation is True.")
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not "
                               f"{(self.output_size_per_partition, self.input_size)} as expected")
        bias = self.bias if not self.skip_bias_add else None
        output, _ = layer_forward.column_forward(self, input_, True, weight=weight, bias=bias, recipe=recipe)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class LoRARowParallelLinear(LoRALayerMixin, RowParallelLinear):
    """RowParallelLinear + LoRA: ``Y = sum_i X_i W_i^T + s (drop(X_i) A_i^T) B^T``, then bias.

    Collectives (exactly the base layer's): forward ONE all-reduce (reduce-scatter under SP) of
    ``[Y_i | drop(X_i) A_i^T]``; backward all-gather of dY under SP, nothing otherwise.
    """

    _base_class = RowParallelLinear
    _base_tp_axes = {"weight": 1}

    def __init__(self, input_size, output_size, *, lora_config: LoRAConfig,
                 lora_init_name: Optional[str] = None, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._setup_lora(lora_config, False, lora_init_name)

    def _lora_layout(self, gated: bool, n_projections: int = 1) -> AdapterLayout:
        return AdapterLayout.row()  # a row layer is never a fused one

    def _comm_mode(self) -> str:
        # Megatron's row layer: explicit expert communication leaves the output unreduced.
        return C.comm_mode(C.group_size(self.tp_group), self.sequence_parallel and not self.explicit_expert_comm,
                           base_reduces=not self.explicit_expert_comm,
                           partial_grads_summed=self._lora_partial_grads_summed and self.explicit_expert_comm)

    def forward(self, input_: torch.Tensor):
        if not self._lora_active():
            layer_forward.take_recipe(self, input_)
            return super().forward(input_)
        if self.input_is_parallel:
            x = input_
        else:
            x = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        recipe = layer_forward.take_recipe(self, x)
        output, _ = layer_forward.row_forward(self, x, True, weight=self.weight, recipe=recipe)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
