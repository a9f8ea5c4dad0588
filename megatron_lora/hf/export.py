"""In-memory export for RL loops: the adapter as PEFT tensors, or the merged model as Hugging
Face tensors streamed one at a time, straight from a training model at any TP / PP / EP / ETP
layout.

An RL loop (verl, NeMo-RL, ...) hands the policy to a vLLM / SGLang engine after every update.
Writing a checkpoint and converting it costs minutes of disk I/O; these functions give the
engine the same tensors the file conversions would write, without files and without touching
the training model (every result is a fresh tensor, no parameter is written).

* :func:`export_peft`: the adapter exactly as ``megatron-to-peft`` writes it. It gathers with
  ``gather_full_adapter`` (what ``save_full_adapter`` writes) and maps with
  ``peft_from_megatron`` (what the converter runs), so tensors and ``adapter_config.json`` are
  the converter's, bit for bit.
* :func:`export_merged`: ``W + s·B·A`` per base tensor (DoRA: ``(m/n) ⊙ (W + s·B·A)`` row-wise), as
  ``merge --to hf`` writes it. For each logical Megatron tensor in pipeline order, every TP rank of
  the stage that holds it merges its own shard out of place in fp32 with ``shard_merge.merged_shard``
  from its local factors (shard i of the formula ``merge_lora`` applies on the fp32 model the
  ``merge`` conversion builds; a DoRA row layer's norm takes one all-reduce of its [out] partial
  squares over the layer's TP group, on every rank of that group alike), casts once,
  splits fused rows per shard into Hugging Face projections (``hf_from_megatron_tensor``, the
  converter's mapping), gathers each projection in the target dtype onto the one rank that sends
  and sends it to the destination over the pipeline group. A mixture-of-experts model's expert
  tensors at EP > 1 (or an expert-TP group that is not the TP group) live outside ``dst``'s
  pipeline group: each is merged by its EP rank's expert-TP group, gathered onto that position's
  rank with ``dst``'s expert-TP rank and sent from there (:class:`_ExpertRoutes`). Peak extra
  memory is about one copy of the largest single tensor (``linear_fc1`` or the embedding) in the
  target dtype, plus shard-sized buffers (the bound is in its docstring), never the model.
  :func:`export_merged_to` hands the stream to a callback and keeps the collective schedule if
  the callback raises.

The architecture is read from the model (``arch_from_model``: its TransformerConfig, vocabulary
and embedding tying); an ``hf_config`` (the engine's config.json as a dict) is checked against
it, so a model the engine would load differently fails before anything is gathered.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lora.core import collectives as C
from megatron_lora.core.checkpoint import dist_ranks
from megatron_lora.core.checkpoint.gather import expert_pass_needed, first_message
from megatron_lora.core.checkpoint.adapter import (
    _check_loaded_factors, _model_config, gather_full_adapter,
)
from megatron_lora.core.inject import global_module_names, lora_modules, model_chunks
from megatron_lora.core.layers import LoRALayerMixin, is_lora_key
from megatron_lora.core.shard_merge import merged_shard
from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_model_args, check_hf_config_matches, hf_from_megatron_tensor, hf_names_of,
    hf_shapes, megatron_names,
)
from megatron_lora.hf.peft_adapters import exported_modules, peft_from_megatron
from megatron_lora.hf.peft_experts import LAYOUTS

WHERE = "the model's adapter"


# ------------------------------------------------------------------------------- architecture

def _unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def arch_from_model(model, hf_config: Optional[dict] = None) -> Arch:
    """The Hugging Face sizes of a ``GPTModel`` of a supported family (Llama, Qwen2, Qwen3,
    Qwen3-MoE, Mixtral), or of its VPP chunks, checked like a ``model_args.json``; with
    ``hf_config`` (a config.json dict) also checked against it."""
    from megatron.core.models.gpt import GPTModel

    chunk = _unwrap(model_chunks(model)[0])
    if not isinstance(chunk, GPTModel):
        raise ConversionError(f"the model is a {type(chunk).__name__}; the Hugging Face export reads a "
                              "Megatron-Core GPTModel (Llama / Qwen2 layout). Export a GPTModel.")
    c = chunk.config
    experts = getattr(c, "num_moe_experts", None)
    unsupported = [what for what, found in (
        ("multi_latent_attention", getattr(c, "multi_latent_attention", False)),
        ("rotary_interleaved", getattr(c, "rotary_interleaved", False)),
        ("qk_l2_norm", getattr(c, "qk_l2_norm", False)),
        ("moe_layer_freq (dense layers between MoE layers)", experts and not _every_layer_moe(c)),
        (f"moe_router_score_function {getattr(c, 'moe_router_score_function', 'softmax')!r}",
         experts and getattr(c, "moe_router_score_function", "softmax") != "softmax"),
        ("moe_router_enable_expert_bias", experts and getattr(c, "moe_router_enable_expert_bias", False)),
        ("moe_router_topk_scaling_factor", experts and getattr(c, "moe_router_topk_scaling_factor", None)),
        ("moe_router_num_groups (group-limited routing)", experts and getattr(c, "moe_router_num_groups", None)),
    ) if found]
    if unsupported:
        raise ConversionError(f"the model uses {', '.join(unsupported)}, which no supported Hugging Face family "
                              "(Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) has; only those export to Hugging Face names.")
    model_args = dict(
        swiglu=bool(c.gated_linear_unit) and c.activation_func is torch.nn.functional.silu,
        normalization=c.normalization, position_embedding_type=chunk.position_embedding_type,
        add_bias_linear=c.add_bias_linear, add_qkv_bias=c.add_qkv_bias, num_layers=c.num_layers,
        hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups, kv_channels=c.kv_channels, padded_vocab_size=chunk.vocab_size,
        untie_embeddings_and_output_weights=not chunk.share_embeddings_and_output_weights,
        qk_layernorm=bool(getattr(c, "qk_layernorm", False)), num_experts=experts,
        moe_router_topk=getattr(c, "moe_router_topk", None),
        moe_ffn_hidden_size=getattr(c, "moe_ffn_hidden_size", None),
        moe_router_pre_softmax=bool(getattr(c, "moe_router_pre_softmax", False)),
        moe_shared_expert_intermediate_size=getattr(c, "moe_shared_expert_intermediate_size", None))
    arch = arch_from_model_args(model_args, "the model (its TransformerConfig)")
    if hf_config is not None:
        check_hf_config_matches(hf_config, arch, "hf_config", other="training model")
    return arch


def _every_layer_moe(config) -> bool:
    """Megatron's ``moe_layer_freq``: 1, or a per-layer list of 1 (MoE) / 0 (dense)."""
    freq = getattr(config, "moe_layer_freq", 1)
    return freq == 1 or (isinstance(freq, (list, tuple)) and all(f == 1 for f in freq))


def _check_dst(dst: Optional[int]) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < world):
        raise ValueError(f"dst must be a global rank in [0, {world}) or None (every rank), got {dst!r}.")


def _receives(dst: Optional[int]) -> bool:
    return dst is None or dst == dist_ranks.rank()


# -------------------------------------------------------------------------------------- PEFT

def export_peft(model, hf_config: Optional[dict] = None, dst: Optional[int] = 0, compact: bool = True,
                base_model_name_or_path: Optional[str] = None,
                expert_layout: str = "fused") -> Optional[Tuple[Dict[str, torch.Tensor], dict]]:
    """The adapter as PEFT tensors (``base_model.model.model.layers.N...lora_A.weight``, on the
    CPU) and its ``adapter_config.json`` dict, on rank ``dst`` (every rank with None); None on
    the others. Collective: every rank calls it. The same bits as ``megatron-to-peft``
    (``compact`` = not ``--keep-rank``, ``expert_layout`` = ``--expert-layout`` with "_": "fused" or
    "per_expert", for mixture-of-experts models); a non-finite factor raises on every rank.

    Only ``dst`` receives the adapter (once); the other ranks send at most their stage's factors
    and one data-parallel replica takes part (``gather_full_adapter``, docs/design.md §16)."""
    _check_dst(dst)
    if expert_layout not in LAYOUTS:
        raise ValueError(f"expert_layout must be one of {LAYOUTS}, got {expert_layout!r}.")
    arch = arch_from_model(model, hf_config)
    cfg = _model_config(model)
    exported_modules(cfg, arch, WHERE)  # what PEFT cannot hold (DoRA experts), refused on every rank
    _check_loaded_factors(model, WHERE)  # each rank its shards, so that every rank raises
    tensors = gather_full_adapter(model, dst=dst)
    if not _receives(dst):
        return None
    peft_tensors, config = peft_from_megatron(tensors, cfg, arch, compact, base_model_name_or_path, WHERE,
                                              expert_layout)
    live = {p.untyped_storage().data_ptr() for m in lora_modules(model) for p in (m.lora_A, m.lora_B)}
    # With TP=1 on the CPU a gathered factor IS the parameter: never hand it out.
    return {k: t.clone() if t.untyped_storage().data_ptr() in live else t for k, t in peft_tensors.items()}, config


# ------------------------------------------------------------------------------------ merged

def export_merged(model, hf_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                  dst: Optional[int] = 0, bucket_bytes: Optional[int] = None) -> Iterator:
    """(Hugging Face name, merged tensor) pairs, one at a time, in pipeline order (embedding,
    layers, final norm, lm_head unless tied), on the model's device, in ``dtype`` (default: the
    parameters' dtype), on rank ``dst`` (every rank with None). A layer's adapter is merged when
    it is enabled, as the forward runs it. The model is checked now, before the first tensor is
    asked for.

    ``bucket_bytes``: yield lists of pairs instead, each holding at most ``bucket_bytes`` (a
    single larger tensor comes alone), for engines that load weights in buckets.

    Collective contract: EVERY rank must drive the iterator to its end (``for _ in it: pass`` on
    ranks that only send); on other ranks than ``dst`` it yields nothing. A receiving rank that
    stops early (a consumer raising, a ``break``) leaves the others blocked in a send or gather
    that never completes. :func:`export_merged_to` keeps the schedule whatever the consumer does.

    Memory: each TP rank of the stage that holds a tensor merges ITS shard, ``W_i + s·B_i·A``
    (column) or ``W_i + s·B·A_i`` (row), in fp32 from its own factors (docs/design.md §1; DoRA
    scales its rows in place by ``m / n``, summing n in fp64 a sixteenth of the rows at a time:
    at most S/2 bytes and [out]-sized vectors more while the fp32 shard lives, inside the bound
    below; docs/design.md §18), casts once, splits fused rows into its share of each projection
    and gathers those onto the one rank that sends (every rank of the stage with ``dst=None``),
    in ``dtype``. An expert tensor at EP > 1 (or an expert-TP group other than the TP group) is
    merged the same way by the expert-TP group of the EP rank that holds it, gathered onto that
    group's rank with ``dst``'s expert-TP rank (expert-TP rank 0 with ``dst=None``, which then
    broadcasts it over the expert tensor-model-pipeline group); with ``dst`` set only ``dst``'s
    expert-data-parallel replica takes part in those. With N the elements of a logical tensor, S this rank's shard of it
    (N/t over TP; N/ETP for an expert on its EP rank; N when replicated; 0 where the rank holds
    none) and d the bytes per element of ``dtype``, the extra memory a rank holds while the
    stream makes that tensor peaks at ``max((4 + d)·S, d·(N + 2·S))`` bytes plus the largest
    layer's local factors in fp32 (so at most that bound for the largest tensor, ``linear_fc1``
    or the embedding of a large vocabulary): the fp32 shard delta and its cast, then the
    gathered or received projection, its shard and (row layers) one row block of the gather.
    Ranks that only contribute a shard stay under ``(4 + d)·S``; with ``dst`` set only the
    data-parallel replica of ``dst`` (for experts: its expert-data-parallel replica) takes part.
    """
    _check_dst(dst)
    if bucket_bytes is not None and not (isinstance(bucket_bytes, int) and bucket_bytes > 0):
        raise ValueError(f"bucket_bytes must be a positive number of bytes or None (one tensor at a time), "
                         f"got {bucket_bytes!r}.")
    arch = arch_from_model(model, hf_config)
    merged = [m.lora_init_name for m in lora_modules(model) if m.lora_merged]
    if merged:
        raise ConversionError(f"{merged[0]} is merged (merge_lora): its weight already holds the adapter. "
                              "Call unmerge_lora(model) before exporting.")
    first = next(p for chunk in model_chunks(model) for p in chunk.parameters())
    _check_loaded_factors(model, WHERE)  # each rank its shards, so that every rank raises
    held = _held_tensors(model)
    routes, expert_routes = _routes(held, arch, dst, first.device)
    stream = _stream(held, routes, expert_routes, arch, dtype or first.dtype, first.device, dst)
    return stream if bucket_bytes is None else _buckets(stream, bucket_bytes)


def export_merged_to(consume: Callable, model, hf_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                     dst: Optional[int] = 0, bucket_bytes: Optional[int] = None) -> None:
    """:func:`export_merged` handed to ``consume(name, tensor)`` (``consume(bucket)`` with
    ``bucket_bytes``) on the receiving ranks, keeping the collective schedule whatever ``consume``
    does: when it raises, this rank stops calling it, still runs the rest of the stream (its
    sends, gathers and receives, so no other rank waits forever) and then re-raises the first
    error. Only the ranks whose ``consume`` raised raise; the others return normally."""
    error = None
    for item in export_merged(model, hf_config, dtype, dst, bucket_bytes):
        if error is None:
            try:
                consume(item) if bucket_bytes is not None else consume(*item)
            except Exception as err:  # noqa: BLE001 - deferred, re-raised below
                error = err
        del item
    if error is not None:
        raise error


def _buckets(stream, limit: int) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """``stream``'s pairs in lists of at most ``limit`` bytes; a larger tensor alone."""
    bucket, size = [], 0
    for name, tensor in stream:
        if bucket and size + tensor.nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


def _held_tensors(model) -> Dict[str, Tuple[torch.nn.Module, str]]:
    """{global Megatron name: (module, parameter name)} of this rank's base parameters."""
    out = {}
    for chunk in model_chunks(model):
        for module, name in global_module_names(_unwrap(chunk)).items():
            for pname, _ in module.named_parameters(recurse=False):
                if not is_lora_key(pname):
                    out[f"{name}.{pname}"] = (module, pname)
    return out


class _Routes:
    """Which pipeline stage holds each dense tensor, and which rank sends it.

    Built with two tensor collectives of a few bytes per tensor name and no ``*_object`` call:
    a 0/1 row per stage over the pipeline group (which names this stage holds; the names
    themselves are ``megatron_names(arch)``, the same list on every rank), and with ``dst`` set
    the global ranks of ``dst``'s pipeline group, broadcast from ``dst``. The shards of a tensor
    are gathered over the TP group; with ``dst`` None every TP rank of the stage gathers them all
    and broadcasts them to its own pipeline group.
    """

    def __init__(self, held: dict, names: List[str], dst: Optional[int], device):
        from megatron.core import parallel_state as ps

        self.dst = dst
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.shard_group = ps.get_tensor_model_parallel_group()
        self.my_stage = ps.get_pipeline_model_parallel_rank()
        self.tp_ranks = dist.get_process_group_ranks(self.shard_group)
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)
        mine = torch.tensor([name in held for name in names], dtype=torch.int32, device=device)
        holders = torch.stack(C.all_gather_list(mine, self.pp_group)).cpu()  # [stages, names]
        missing = [n for n, count in zip(names, holders.sum(0).tolist()) if count == 0]
        if missing:
            raise ConversionError(
                f"no rank holds {missing[:3]}{' ...' if len(missing) > 3 else ''}: the export reads Megatron's "
                f"local GPT spec ({_LOCAL_SPEC}); {_NOT_LOCAL_SPEC} are not supported.")
        self.stage = dict(zip(names, holders.argmax(0).tolist()))  # the first stage that holds it
        self.dst_pp_ranks = self.pp_ranks
        if dst is not None and dist.get_world_size() > 1:
            ranks = torch.tensor(self.pp_ranks, dtype=torch.int64, device=device)
            dist.broadcast(ranks, src=dst)
            self.dst_pp_ranks = ranks.tolist()

    def source(self, name: str) -> int:
        """The global rank that sends ``name`` (to ``dst``, or to its pipeline group if None)."""
        return self.dst_pp_ranks[self.stage[name]]

    def computes(self, name: str) -> bool:
        """Whether this rank merges a shard of ``name`` (the source's TP group does)."""
        return self.my_stage == self.stage[name] and self.source(name) in self.tp_ranks

    def gather_to(self, name: str) -> Optional[int]:
        """The rank the shards are gathered onto; None: every rank of the TP group."""
        return None if self.dst is None else self.source(name)

    def fanout(self, name: str):
        """With ``dst`` None, the group the source broadcasts ``name`` to (None: nobody else needs it)."""
        return self.pp_group if self.dst is None and len(self.pp_ranks) > 1 else None


_LOCAL_SPEC = "separate input_layernorm / pre_mlp_layernorm modules, SequentialMLP experts"
_NOT_LOCAL_SPEC = ("Transformer Engine specs with norms fused into linear_qkv / linear_fc1, and grouped experts "
                   "(TEGroupedMLP)")
_EXPERT_NAME = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc[12]\.weight$")


class _ExpertRoutes:
    """Which rank merges and sends each expert tensor, where experts need a pass of their own
    (expert parallelism, or an expert-TP group that is not the TP group: ``dst``'s data-parallel
    replica then does not hold every expert, docs/design.md §16).

    The expert group (Megatron's expert tensor-model-pipeline group: the expert-TP x EP x PP
    ranks of one expert-data-parallel rank) holds every expert once. Global expert ``e`` of layer
    ``N`` lives on EP rank ``e // local experts`` (Megatron's even, ordered split, as
    ``inject.global_module_names`` numbers it) at layer ``N``'s stage, sharded over that
    position's expert-TP group. Its source is the rank of that position with ``dst``'s expert-TP
    rank (expert-TP rank 0 when ``dst`` is None, one source per expert group): the position's
    expert-TP ranks ``gather`` their merged shards onto it, and it sends the tensor to ``dst``, or
    broadcasts it over its expert group, so that each expert-data-parallel replica serves its own
    ranks. With ``dst`` set, the ranks of the other replicas take no part.

    Built with one all-gather of each rank's (EP rank, stage, expert-TP rank), 3 int32, over the
    expert group (the coordinates of every source, whatever Megatron's rank order), after each
    rank checks that it holds exactly the experts that numbering gives it (``first_message``: one
    int64 all-reduce, so every rank raises alike).
    """

    def __init__(self, held: dict, arch: Arch, layer_stage: Dict[int, int], dst: Optional[int], device):
        from megatron.core import parallel_state as ps

        self.dst, self.layer_stage = dst, layer_stage
        self.shard_group = ps.get_expert_tensor_parallel_group()
        self.group = ps.get_expert_tensor_model_pipeline_parallel_group()
        ranks = dist.get_process_group_ranks(self.group)
        self.local = arch.num_experts // ps.get_expert_model_parallel_world_size()
        self.me = (ps.get_expert_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        experts = [name for name in megatron_names(arch) if _EXPERT_NAME.match(name)]
        found = first_message(next(filter(None, (self._misplaced(name, held) for name in experts)), None))
        if found is not None:
            raise ConversionError(found)
        row = torch.tensor([*self.me, ps.get_expert_tensor_parallel_rank()], dtype=torch.int32, device=device)
        table = [tuple(r.tolist()) for r in C.all_gather_list(row, self.group)]
        self.rank_at = {coords: rank for coords, rank in zip(table, ranks)}  # (EP rank, stage, ETP rank) -> rank
        self.takes_part = dst is None or dst in ranks
        self.etp = table[ranks.index(dst)][2] if dst is not None and self.takes_part else 0

    def covers(self, name: str) -> bool:
        return _EXPERT_NAME.match(name) is not None

    def _position(self, name: str) -> Tuple[int, int]:
        """(owner EP rank, stage) of an expert tensor."""
        layer, expert = map(int, _EXPERT_NAME.match(name).groups())
        return expert // self.local, self.layer_stage[layer]

    def _misplaced(self, name: str, held: dict) -> Optional[str]:
        mine = self._position(name) == self.me
        if mine == (name in held):
            return None
        return (f"rank {dist_ranks.rank()} (EP rank {self.me[0]}, stage {self.me[1]}) {'lacks' if mine else 'holds'} "
                f"{name}: the export expects Megatron's local spec ({_LOCAL_SPEC}, split evenly and in order over "
                f"the EP ranks); {_NOT_LOCAL_SPEC} are not supported.")

    def source(self, name: str) -> Optional[int]:
        """The global rank that sends ``name`` (None on ranks of another expert-data-parallel replica)."""
        return self.rank_at[(*self._position(name), self.etp)] if self.takes_part else None

    def computes(self, name: str) -> bool:
        """Whether this rank merges a shard of ``name`` (the owner position's expert-TP group does)."""
        return self.takes_part and self._position(name) == self.me

    def gather_to(self, name: str) -> Optional[int]:
        return self.source(name)

    def fanout(self, name: str):
        return self.group if self.dst is None and C.group_size(self.group) > 1 else None


def _routes(held, arch: Arch, dst: Optional[int], device):
    """(dense routes, expert routes or None): experts take their own routes where the adapter
    gather's expert pass does (``gather.expert_pass_needed``)."""
    names = megatron_names(arch)
    experts = bool(arch.num_experts) and expert_pass_needed()
    dense = _Routes(held, [n for n in names if not (experts and _EXPERT_NAME.match(n))], dst, device)
    if not experts:
        return dense, None
    stages = {layer: dense.stage[f"decoder.layers.{layer}.input_layernorm.weight"] for layer in range(arch.num_layers)}
    return dense, _ExpertRoutes(held, arch, stages, dst, device)


def _stream(held, routes: _Routes, expert_routes: Optional[_ExpertRoutes], arch: Arch, dtype, device,
            dst) -> Iterator[Tuple[str, torch.Tensor]]:
    shapes, rank = hf_shapes(arch), dist_ranks.rank()
    for name in megatron_names(arch):
        route = expert_routes if expert_routes is not None and expert_routes.covers(name) else routes
        src, to, fanout = route.source(name), route.gather_to(name), route.fanout(name)
        shards, dim = [], None
        if route.computes(name):
            module, pname = held[name]
            dim = _partition_dim(getattr(module, pname), route.shard_group)
            if dim is not None or to is None or rank == to:  # a replicated tensor: the gathering rank's copy only
                t = dist.get_world_size(route.shard_group)
                shards = [piece for _, piece in _merged_shard_pieces(name, module, pname, dtype, arch, dim, t)]
        for hf_name in hf_names_of(name, arch):
            piece = None
            if shards:
                shard = shards.pop(0)  # keep no reference to what is handed out
                piece = _gather_pieces(shard, dim, route.shard_group, to, shapes[hf_name])
                del shard
            if fanout is not None:  # dst None: the source's copy to every rank of its group
                if piece is None:
                    piece = torch.empty(shapes[hf_name], dtype=dtype, device=device)
                dist.broadcast(piece, src=src, group=fanout)
            elif dst is not None and src != dst and rank == dst:
                piece = torch.empty(shapes[hf_name], dtype=dtype, device=device)
                dist.recv(piece, src=src)
            elif dst is not None and src != dst and rank == src:
                dist.send(piece, dst=dst)
            if _receives(dst):
                yield hf_name, piece
            del piece


def _partition_dim(param: torch.nn.Parameter, group) -> Optional[int]:
    """The dim Megatron splits ``param`` on over ``group``; None when every rank holds all of it."""
    dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
    return None if dist.get_world_size(group) == 1 else dim


def _merged_shard_pieces(name: str, module, pname: str, dtype, arch: Arch, dim: Optional[int], t: int):
    """This rank's shard of ``name`` (the whole tensor when ``dim`` is None), a fresh tensor in
    ``dtype`` with the layer's enabled adapter merged in fp32 from the LOCAL factors, split into
    (Hugging Face name, this rank's share of that projection).

    Merging is local and exact (docs/design.md §1): rows i of ``s·B·A`` are ``s·B_i·A`` (column),
    columns i are ``s·B·A_i`` (row), so the fp32 sum here is, element for element, ``merge_lora``'s
    on the fp32 TP=1 model of the ``merge`` conversion (IEEE addition commutes), and the cast of a
    shard is the shard of the cast. A DoRA layer's norm is summed in fp64 (``dora.rescale_merged``;
    a row layer all-reduces its partial squares, collective over its TP group), so its scale is
    the TP=1 one too. Fused rows split per shard too: a ``linear_fc1`` shard is
    ``[gate_i; up_i]`` (§7) and a ``linear_qkv`` shard holds whole query groups, ``[q; k; v]`` of
    heads/t heads in groups/t groups, so each HF projection's shards are rows i of it.
    """
    param = getattr(module, pname).detach()
    with torch.no_grad():
        if isinstance(module, LoRALayerMixin) and pname == "weight" and module.lora_enabled:
            merged = merged_shard(module, dtype)  # one cast; the fp32 merge is freed on return
        else:
            merged = param.to(dtype, copy=True)  # never a parameter
    local = arch
    if dim == 0:  # Megatron splits whole query groups over the TP ranks
        local = dataclasses.replace(arch, num_heads=arch.num_heads // t, num_groups=arch.num_groups // t)
    return hf_from_megatron_tensor(name, merged, local)


def _gather_pieces(shard: torch.Tensor, dim: Optional[int], group, to: Optional[int], shape) -> Optional[torch.Tensor]:
    """The TP shards of one projection, split on ``dim``, joined in ``shard``'s dtype on global
    rank ``to`` (on every rank of ``group`` with None; None on the others). The result is a new
    tensor: dim 0 gathers straight into row blocks of it; dim 1 gathers one row block of every
    shard at a time (a buffer of one shard's size) and copies it in, so nothing of the
    projection's size exists twice."""
    if dim is None:
        return shard if to is None or to == dist_ranks.rank() else None
    t, receives = dist.get_world_size(group), to is None or to == dist_ranks.rank()
    out = torch.empty(shape, dtype=shard.dtype, device=shard.device) if receives else None
    if dim == 0:
        _gather(shard, list(out.split(shard.shape[0])) if receives else None, group, to)
        return out
    n_rows, cols = shard.shape
    bounds = [n_rows * i // t for i in range(t + 1)]
    for r0, r1 in zip(bounds, bounds[1:]):
        if r0 == r1:
            continue
        buffer = torch.empty(t, r1 - r0, cols, dtype=shard.dtype, device=shard.device) if receives else None
        _gather(shard[r0:r1], list(buffer.unbind(0)) if receives else None, group, to)
        if receives:
            out[r0:r1].view(r1 - r0, t, cols).copy_(buffer.transpose(0, 1))
        del buffer
    return out


def _gather(tensor: torch.Tensor, outputs: Optional[List[torch.Tensor]], group, to: Optional[int]) -> None:
    """Every rank's ``tensor`` into ``outputs`` (rank order) on ``to``, or on every rank (None)."""
    if to is None:
        dist.all_gather(outputs, tensor.contiguous(), group=group)
    else:
        dist.gather(tensor.contiguous(), outputs, dst=to, group=group)
