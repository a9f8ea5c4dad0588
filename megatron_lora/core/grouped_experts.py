"""LoRA on grouped MoE experts: Megatron's ``TEGroupedMLP`` (``moe_grouped_gemm`` on Transformer Engine).

``TEGroupedMLP`` holds all local experts of a layer in two TE ``GroupedLinear`` modules,
``linear_fc1`` (``TEColumnParallelGroupedLinear``) and ``linear_fc2``
(``TERowParallelGroupedLinear``), with one weight per local expert (``weight0 .. weight{E-1}``)
and ``forward(x, m_splits)``, ``m_splits[j]`` the rows of ``x`` routed to local expert ``j``.
The LoRA layers here keep that shape: one adapter per local expert, stacked,

    column (fc1):  lora_A [E, r, in]      replicated over expert-TP    lora_B [E, out/t, r]  sharded
    row    (fc2):  lora_A [E, r, in/t]    sharded                      lora_B [E, out, r]    replicated

(per expert exactly ``AdapterLayout.column`` / ``row``, gated fc1 rows ``[gate_i; up_i]``), and
the branch runs grouped too, never as a Python loop of per-expert GEMMs:

    y = base(x, m_splits) + s * grouped(x)     grouped: pad each expert's rows to the longest,
                                               [E, M, in] -bmm-> [E, M, r] -bmm-> [E, M, out]

``torch.bmm`` runs on CPU and GPU. The padding costs ``E x max(m_splits)`` rows instead of
``sum(m_splits)``; torch's grouped matmul (``torch._grouped_mm``, offsets instead of padding) is
the candidate for the next GPU run; it has never run here, so it is not switched on.

Equivalence with ``SequentialMLP`` (docs/design.md §17): local expert ``j`` on EP rank ``p`` is
global expert ``g = p E + j`` and is initialised, named and saved exactly as the sequential
expert ``...mlp.experts.local_experts.{g}.linear_fc1``, so a grouped and a sequential model with
the same base weights have the same logical adapter and the same outputs, and adapters move
between them (``expert_adapters`` gives the per-expert view the checkpoint code reads).

Communication: none inside the layer, as for the base: the token dispatcher all-gathers tokens
over the expert-TP group before fc1 and reduce-scatters fc2's partial output after it, so the
base's messages carry the branch too. At expert-TP > 1 the replicated factor's gradient is a
per-rank partial sum; it is marked ``sequence_parallel`` when ``finalize_model_grads`` sums those
over exactly the expert-TP group (SP on, expert-TP group = TP group), and refused otherwise
(the sequential layers' ``"rider_only"`` all-reduce has no grouped counterpart yet).

Refused with a message: LoRA dropout (SequentialMLP draws each expert's fc1 and fc2 masks in
turn, expert by expert; a grouped layer draws all fc1 rows before any fc2 row, so the masks could
not be the sequential ones), per-projection LoRA, GTP-sharded weights.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_lora.core import collectives as C
from megatron_lora.core import compat
from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.init import logical_lora_a
from megatron_lora.core.layers import LoRALayerMixin, _finalize_sums_over, is_gated_fc1
from megatron_lora.core.layout import AdapterLayout
from megatron_lora.core.shard_merge import fp32_lora_delta
from megatron_lora.core.sharded_state import LORA_FACTORS
from megatron_lora.core.te_import import require_te

require_te("megatron_lora.core.grouped_experts", "build MoE experts without moe_grouped_gemm (SequentialMLP)")

from megatron.core.extensions.transformer_engine import (  # noqa: E402
    TEColumnParallelGroupedLinear,
    TERowParallelGroupedLinear,
)


def grouped_lora_branch(x: torch.Tensor, m_splits: Sequence[int], lora_a: torch.Tensor,
                        lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s (x_j A_j^T) B_j^T`` on each expert's rows ``x_j`` (consecutive blocks of ``m_splits``
    rows), as two batched products over all experts: no per-expert GEMM, no Python loop.

    ``x``: ``[T, in]`` (any leading dims); ``lora_a``: ``[E, r, in]``; ``lora_b``: ``[E, out, r]``.
    Each expert's rows are placed at the start of its own ``max(m_splits)``-row slot (zero rows
    after them), so the product of a padded row never reaches the output. Autograd gives the
    gradients of ``x`` and both factors; an expert with no rows gets zero factor gradients.
    """
    n_experts, width = lora_a.shape[0], x.shape[-1]
    rows = x.reshape(-1, width)
    counts = torch.as_tensor([int(m) for m in m_splits], dtype=torch.long, device=x.device)
    longest = int(counts.max()) if n_experts else 0
    expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts)
    first_row = torch.cumsum(counts, 0) - counts  # each expert's first row in x
    slot = torch.arange(rows.shape[0], device=x.device) - first_row[expert] + expert * longest
    padded = rows.new_zeros(n_experts * longest, width).index_copy(0, slot, rows)
    u = torch.bmm(padded.view(n_experts, longest, width), lora_a.transpose(1, 2)) * scaling
    v = torch.bmm(u, lora_b.transpose(1, 2))  # [E, M, out]
    return v.reshape(n_experts * longest, -1).index_select(0, slot).view(*x.shape[:-1], -1)


_SPEC_CLASSES = {}  # (LoRA class, LoRAConfig) -> the class with that config bound (for_spec)


class ExpertAdapter:
    """Local expert ``j``'s adapter in a grouped LoRA layer, seen as one LoRA layer's adapter:
    what the checkpoint code reads (``lora_A`` / ``lora_B`` are views into the stacked factors,
    so loading into them loads the layer), under the sequential expert's name."""

    is_expert = True  # checkpoint/gather.py gathers expert layers over the expert groups

    def __init__(self, layer: "GroupedLoRAMixin", local_index: int, name: str):
        self.layer, self.local_index, self.lora_init_name = layer, local_index, name
        self.lora_layout, self.lora_config = layer.lora_layout, layer.lora_config

    @property
    def lora_group(self):
        return self.layer.lora_group

    @property
    def lora_A(self) -> torch.Tensor:
        return self.layer.lora_A[self.local_index]

    @property
    def lora_B(self) -> torch.Tensor:
        return self.layer.lora_B[self.local_index]

    def lora_logical_shape(self, factor: str):
        return self.layer.lora_logical_shape(factor)

    def lora_tensor_names(self) -> tuple:
        return LORA_FACTORS  # grouped experts refuse DoRA


class GroupedLoRAMixin(LoRALayerMixin):
    """Shared by the grouped LoRA layers. Class attributes: ``_te_base`` (Megatron's wrapper, also
    ``_base_class`` for ``from_base``) and ``lora_parallel_mode`` ("column" | "row")."""

    _spec_lora_config: Optional[LoRAConfig] = None  # bound by ``for_spec``

    def __init__(self, num_gemms, input_size, output_size, *, lora_config: Optional[LoRAConfig] = None,
                 lora_init_name: Optional[str] = None, **kwargs):
        lora_config = lora_config if lora_config is not None else self._spec_lora_config
        self._te_base.__init__(self, num_gemms, input_size, output_size, **kwargs)
        gated = self.lora_parallel_mode == "column" and is_gated_fc1(self.config, kwargs.get("tp_comm_buffer_name"))
        self._become_lora(lora_config, gated, lora_init_name)

    @classmethod
    def for_spec(cls, lora_config: LoRAConfig) -> type:
        """This class with ``lora_config`` bound, for a LoRA spec: megatron-core 0.19's TEGroupedMLP
        calls the class in its spec itself (no ``build_module``, so a ``ModuleSpec`` with params
        cannot go there), 0.16's builds it with ``build_module``; a class serves both."""
        key = (cls, lora_config)
        if key not in _SPEC_CLASSES:
            _SPEC_CLASSES[key] = type(cls.__name__, (cls,), dict(
                _spec_lora_config=lora_config, __module__=cls.__module__, __qualname__=cls.__qualname__))
        return _SPEC_CLASSES[key]

    @property
    def lora_group(self):
        """The expert-TP group the factors are laid out over (the base's: Megatron's ``_tp_group``)."""
        return self._tp_group

    @property
    def _base_tp_axes(self):
        return {"weight": 0, "bias": 0} if self.lora_parallel_mode == "column" else {"weight": 1}

    # ------------------------------------------------------------------------------ setup

    def _become_lora(self, lora_config: LoRAConfig, gated: bool, lora_init_name, qkv: bool = False):
        name = type(self).__name__
        if not isinstance(lora_config, LoRAConfig):
            raise TypeError(f"{name} needs lora_config=LoRAConfig(...), got {type(lora_config).__name__}.")
        if lora_config.dropout:
            raise ValueError(
                f"{name}: LoRA dropout on grouped experts is not supported (expected dropout=0, found "
                f"{lora_config.dropout}): SequentialMLP draws each expert's fc1 and fc2 masks expert by "
                "expert, a grouped layer cannot draw the same ones. Set --lora-dropout 0, or build the "
                "experts without moe_grouped_gemm (SequentialMLP).")
        if lora_config.expert_adapters != "per_expert":
            raise ValueError(
                f"{name}: expert_adapters={lora_config.expert_adapters!r} is not supported on grouped "
                "experts (expected 'per_expert': the grouped branch stacks one adapter per local expert). "
                "Use --lora-expert-adapters per_expert, or build the experts without moe_grouped_gemm "
                "(SequentialMLP).")
        if lora_config.per_projection:
            raise ValueError(f"{name}: per-projection LoRA (--lora-per-projection) is not supported on "
                             "grouped experts; drop it or build the experts without moe_grouped_gemm.")
        if lora_config.use_dora:
            raise ValueError(f"{name}: DoRA (--lora-use-dora) is not supported on grouped experts; drop it, "
                             "or build the experts without moe_grouped_gemm (SequentialMLP at expert-TP 1).")
        if getattr(self.weight0, "gtp_remat_size", 1) > 1:
            raise ValueError(f"{name}: the expert weights are GTP-sharded (gtp_remat_size > 1), which "
                             "LoRA layers do not support; build the model without a gtp_remat group.")
        world = C.group_size(self.lora_group)
        if world > 1 and not _finalize_sums_over(self.config, self.lora_group):
            raise ValueError(
                f"{name}: at expert-TP {world} the replicated LoRA factor's gradient is a partial sum "
                "per rank, which finalize_model_grads sums only with sequence parallelism on and the "
                "expert-TP group equal to the TP group (expected expert_tensor_parallel_size == "
                f"tensor_model_parallel_size and sequence_parallel=True; found TP "
                f"{self.config.tensor_model_parallel_size}, sequence_parallel="
                f"{self.config.sequence_parallel}). Use those settings, expert-TP 1, or SequentialMLP "
                "experts (no moe_grouped_gemm).")
        self.lora_config, self.lora_scaling = lora_config, lora_config.scaling
        self.lora_row_projections = None
        self.lora_layout = (AdapterLayout.column(gated=gated) if self.lora_parallel_mode == "column"
                            else AdapterLayout.row())
        self.lora_enabled, self.lora_merged, self.lora_init_name = True, False, None
        self.is_expert = True  # Megatron's TEGroupedLinear holds experts only (it asserts is_expert)
        if self.lora_parallel_mode == "column":
            self.input_size, self.output_size = self.in_features, self.out_features * world
        else:
            self.input_size, self.output_size = self.in_features * world, self.out_features
        if lora_config.rank > min(self.input_size, self.output_size):
            raise ValueError(f"{name}: LoRA rank {lora_config.rank} exceeds the expert's smaller side "
                             f"(in {self.input_size}, out {self.output_size}); choose a smaller rank.")
        ref = self.weight0
        for factor in LORA_FACTORS:
            shape = self.lora_layout.local_shape(factor, self.lora_logical_shape(factor), world)
            param = torch.nn.Parameter(torch.empty((self.num_gemms, *shape), device=ref.device, dtype=ref.dtype))
            dim = self.lora_layout.partition_dim(factor)
            if dim is not None:
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim + 1, stride=1)
            else:  # a partial sum per expert-TP rank, summed by finalize_model_grads (checked above)
                param.sequence_parallel = world > 1
            param.allreduce = False  # reduced over the expert-data-parallel group, as every expert factor
            setattr(self, factor, param)
        if lora_init_name is not None:
            self.init_lora(lora_init_name)

    def _comm_mode(self) -> str:
        return "none" if C.group_size(self.lora_group) == 1 else "partial"

    def _expert_offset(self) -> Tuple[int, int]:
        """(global index of the first local expert, number of experts over the EP group)."""
        ep = getattr(getattr(self, "_pg_collection", None), "ep", None)
        if ep is not None:
            rank, size = C.group_rank(ep), C.group_size(ep)
        else:
            rank = parallel_state.get_expert_model_parallel_rank()
            size = parallel_state.get_expert_model_parallel_world_size()
        return rank * self.num_gemms, size * self.num_gemms

    def expert_names(self, name: Optional[str] = None) -> List[str]:
        """The sequential names of the local experts' layers: ``holder.linear_fc1`` becomes
        ``holder.local_experts.{global index}.linear_fc1``."""
        holder, leaf = (name or self.lora_init_name).rsplit(".", 1)
        first, _ = self._expert_offset()
        return [f"{holder}.local_experts.{first + j}.{leaf}" for j in range(self.num_gemms)]

    @torch.no_grad()
    def init_lora(self, name: str) -> None:
        """Each local expert's A exactly as the sequential expert of the same global index gets it
        (``init.logical_lora_a`` under that expert's name), B = 0. The draw is a pure function of
        (seed, name), so each rank draws it and keeps its shard: no communication."""
        cfg, layout = self.lora_config, self.lora_layout
        world, rank = C.group_size(self.lora_group), C.group_rank(self.lora_group)
        for j, expert_name in enumerate(self.expert_names(name)):
            full = logical_lora_a(self.lora_logical_shape("lora_A"), cfg.init, cfg.seed, expert_name, cfg.rank)
            self.lora_A[j].copy_(layout.shard("lora_A", full, rank, world))
        self.lora_B.zero_()
        self.lora_init_name = name

    def expert_adapters(self) -> Iterator[ExpertAdapter]:
        """One ``ExpertAdapter`` per local expert, under the sequential expert's name."""
        for j, name in enumerate(self.expert_names()):
            yield ExpertAdapter(self, j, name)

    # ---------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, m_splits):
        out, bias = self._te_base.forward(self, x, m_splits)
        if not self._lora_active():
            return out, bias
        return out + grouped_lora_branch(x, m_splits, self.lora_A, self.lora_B, self.lora_scaling), bias

    # ------------------------------------------------------------------------ merge, repr

    def _weights(self) -> List[torch.Tensor]:
        return [getattr(self, f"weight{j}") for j in range(self.num_gemms)]

    def lora_delta(self) -> torch.Tensor:
        """``s B_j A_j`` of every local expert, stacked ``[E, out, in]`` in the weights' dtype."""
        with torch.no_grad():
            return torch.stack([fp32_lora_delta(a, b, self.lora_scaling)
                                for a, b in zip(self.lora_A, self.lora_B)]).to(self.weight0.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each expert's adapter into its weight; the unmerged weights wait on the CPU."""
        if self.lora_merged:
            return
        self._lora_unmerged_weights = [w.detach().to("cpu", copy=True) for w in self._weights()]
        for w, delta in zip(self._weights(), self.lora_delta()):
            w.add_(delta)
        self.lora_merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` bit for bit."""
        if self.lora_merged:
            for w, saved in zip(self._weights(), self._lora_unmerged_weights):
                w.copy_(saved)
            self._lora_unmerged_weights = None
            self.lora_merged = False

    def _lora_base_repr(self) -> str:
        return (f"{type(self).__name__}(experts={self.num_gemms}, per expert in={self.input_size}, "
                f"out={self.output_size}, expert-TP={C.group_size(self.lora_group)}, bias={self.use_bias})")

    # ------------------------------------------------------------------ distributed checkpoint

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's grouped entries for the base; each local expert's factors as the sequential
        expert's (the key ``{prefix}lora_A`` with the expert axis at the global index, or with
        ``singleton_local_shards`` the prefix ``{global index}.``), replicas over expert-DP."""
        sharded = self._te_base.sharded_state_dict(self, prefix, sharded_offsets, metadata)
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

        singleton = (metadata or {}).get("singleton_local_shards", False)
        first, n_global = self._expert_offset()
        expert_dp = getattr(getattr(self, "_pg_collection", None), "expt_dp", None)
        dp_rank = C.group_rank(expert_dp) if expert_dp is not None else \
            parallel_state.get_expert_data_parallel_rank()
        axes = {f: d for f in LORA_FACTORS if (d := self.lora_layout.partition_dim(f)) is not None}
        for j in range(self.num_gemms):
            g = first + j
            offsets = sharded_offsets if singleton else (*sharded_offsets, (len(sharded_offsets), g, n_global))
            state = {f"{j}.{f}": getattr(self, f)[j] for f in LORA_FACTORS}
            sub = compat.make_sharded_tensors_for_checkpoint(
                state, "", {f"{j}.{f}": d for f, d in axes.items()}, offsets, self.lora_group, metadata)
            if self.lora_layout.gated:
                sub[f"{j}.lora_B"] = compat.apply_swiglu_sharded_factory(sub[f"{j}.lora_B"], offsets, metadata)
            replace_prefix_for_sharding(sub, f"{j}.", f"{g}.{prefix}" if singleton else prefix)
            for f in LORA_FACTORS:
                entry = sub[f"{j}.{f}"]
                entry.replica_id = (*entry.replica_id[:2], dp_rank)
                sharded[f"{prefix}{j}.{f}"] = entry
        return sharded


class LoRATEColumnParallelGroupedLinear(GroupedLoRAMixin, TEColumnParallelGroupedLinear):
    """TEColumnParallelGroupedLinear + one LoRA adapter per local expert (grouped ``linear_fc1``)."""

    _base_class = _te_base = TEColumnParallelGroupedLinear
    lora_parallel_mode = "column"


class LoRATERowParallelGroupedLinear(GroupedLoRAMixin, TERowParallelGroupedLinear):
    """TERowParallelGroupedLinear + one LoRA adapter per local expert (grouped ``linear_fc2``)."""

    _base_class = _te_base = TERowParallelGroupedLinear
    lora_parallel_mode = "row"


LORA_FOR_GROUPED_BASE = {cls._base_class: cls for cls in (
    LoRATEColumnParallelGroupedLinear, LoRATERowParallelGroupedLinear)}
